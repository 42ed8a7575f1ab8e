using System.Diagnostics;
using System.Text;
using Spindle.Fuse.Devices;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests.Support;

/// <summary>The spindle program under test (<see cref="SpindleExecutable"/>: $SPINDLE_CLI, else the build next to the tests).</summary>
internal static class SpindleCli
{
    public static string Program => SpindleExecutable.Path;

    public static Task<ProcessResult> RunAsync(params string[] arguments) => PeerTool.RunAsync(Program, arguments, TimeSpan.FromSeconds(120));

    /// <summary>Starts a long-running spindle (mount) and waits for its first line of standard output.</summary>
    public static async Task<(Process Process, string FirstLine, StringBuilder Output)> StartAsync(params string[] arguments)
    {
        var output = new StringBuilder();
        var firstLine = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        var startInfo = new ProcessStartInfo(Program)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var argument in arguments)
        {
            startInfo.ArgumentList.Add(argument);
        }

        var process = new Process { StartInfo = startInfo };
        process.OutputDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                lock (output)
                {
                    output.AppendLine(e.Data);
                }

                firstLine.TrySetResult(e.Data);
            }
        };
        process.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                lock (output)
                {
                    output.AppendLine(e.Data);
                }
            }
        };
        process.Exited += (_, _) => firstLine.TrySetException(new InvalidOperationException("spindle exited before printing anything"));
        process.EnableRaisingEvents = true;
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        try
        {
            var line = await firstLine.Task.WaitAsync(TimeSpan.FromSeconds(60), TestContext.Current.CancellationToken);
            return (process, line, output);
        }
        catch (Exception exception)
        {
            await StopAsync(process);
            string text;
            lock (output)
            {
                text = output.ToString();
            }

            Assert.Fail($"spindle {string.Join(' ', arguments)} did not start: {exception.Message}\n{text}");
            throw;
        }
    }

    /// <summary>Stops a spindle process: SIGTERM, then SIGKILL after 30 s. Returns its exit code.</summary>
    public static async Task<int> StopAsync(Process process)
    {
        if (!process.HasExited)
        {
            PeerTool.Signal(process, DaemonProcess.SigTerm);
            using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            try
            {
                await process.WaitForExitAsync(wait.Token);
            }
            catch (OperationCanceledException)
            {
                process.Kill(entireProcessTree: true);
                await process.WaitForExitAsync(CancellationToken.None);
            }
        }

        return process.ExitCode;
    }

    /// <summary>Whatever happened in a test, leaves no mount on <paramref name="directory"/>.</summary>
    public static void EnsureUnmounted(string directory)
    {
        for (var attempt = 0; attempt < 4 && MountTable.Find(directory) is not null; attempt++)
        {
            MountTable.Unmount(directory, lazy: true);
        }
    }
}
