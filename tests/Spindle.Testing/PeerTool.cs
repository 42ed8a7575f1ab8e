using System.Diagnostics;
using System.Text;
using Xunit;

namespace Spindle.Testing;

/// <summary>The output of a finished process.</summary>
public sealed record ProcessResult(int ExitCode, string StandardOutput, string StandardError, TimeSpan Elapsed)
{
    public override string ToString() => $"exit {ExitCode} after {Elapsed.TotalSeconds:F1} s\n--- stdout ---\n{StandardOutput}\n--- stderr ---\n{StandardError}";
}

/// <summary>
/// Real peer programs (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, nbdkit, nbd-server...). A missing peer fails
/// the test with a pointer to the install script: interoperability is never skipped.
/// </summary>
public static partial class PeerTool
{
    /// <summary>Debian's python, which has the libnbd bindings (a pyenv python on PATH does not).</summary>
    public const string SystemPython = "/usr/bin/python3";

    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(120);

    /// <summary>The full path of <paramref name="name"/>, or a failed test if it is not installed.</summary>
    public static string Require(string name)
    {
        if (Path.IsPathRooted(name))
        {
            Assert.True(File.Exists(name), $"{name} is not installed: run scripts/install-deps.sh");
            return name;
        }

        foreach (var directory in (Environment.GetEnvironmentVariable("PATH") ?? "/usr/bin:/bin").Split(':').Append("/usr/sbin").Append("/sbin"))
        {
            var candidate = Path.Combine(directory, name);
            if (File.Exists(candidate))
            {
                return candidate;
            }
        }

        Assert.Fail($"{name} is not installed: run scripts/install-deps.sh (interop tests never skip a missing peer)");
        return name;
    }

    /// <summary>Runs a program to completion (killing it after <paramref name="timeout"/>), capturing its output.</summary>
    public static async Task<ProcessResult> RunAsync(string program, IEnumerable<string> arguments, TimeSpan? timeout = null, string? standardInput = null, IDictionary<string, string>? environment = null, string? workingDirectory = null)
    {
        var startInfo = CreateStartInfo(Require(program), arguments, environment, workingDirectory);
        startInfo.RedirectStandardInput = standardInput is not null;
        using var process = new Process { StartInfo = startInfo };
        var stdout = new StringBuilder();
        var stderr = new StringBuilder();
        process.OutputDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                lock (stdout)
                {
                    stdout.AppendLine(e.Data);
                }
            }
        };
        process.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
            {
                lock (stderr)
                {
                    stderr.AppendLine(e.Data);
                }
            }
        };

        var watch = Stopwatch.StartNew();
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        if (standardInput is not null)
        {
            await process.StandardInput.WriteAsync(standardInput);
            process.StandardInput.Close();
        }

        var limit = timeout ?? DefaultTimeout;
        using var cancellation = new CancellationTokenSource(limit);
        try
        {
            await process.WaitForExitAsync(cancellation.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync(CancellationToken.None);
            Assert.Fail($"{program} {string.Join(' ', arguments)} did not finish within {limit.TotalSeconds} s\n{stdout}\n{stderr}");
        }

        // WaitForExitAsync returns once the output streams are drained.
        lock (stdout)
        {
            lock (stderr)
            {
                return new ProcessResult(process.ExitCode, stdout.ToString(), stderr.ToString(), watch.Elapsed);
            }
        }
    }

    /// <summary>Runs a program and fails the test unless it exits with 0.</summary>
    public static async Task<ProcessResult> RunCheckedAsync(string program, IEnumerable<string> arguments, TimeSpan? timeout = null, string? standardInput = null)
    {
        var argumentList = arguments.ToList();
        var result = await RunAsync(program, argumentList, timeout, standardInput);
        Assert.True(result.ExitCode == 0, $"{program} {string.Join(' ', argumentList)} failed: {result}");
        return result;
    }

    /// <summary>Runs a Python script with Debian's python3, where the libnbd bindings (import nbd) live.</summary>
    public static Task<ProcessResult> RunPythonAsync(string script, IEnumerable<string> arguments, TimeSpan? timeout = null) =>
        RunAsync(SystemPython, new[] { "-c", script }.Concat(arguments), timeout);

    /// <summary>Starts a long-running program (a peer server) that the caller stops.</summary>
    public static Process Start(string program, IEnumerable<string> arguments, IDictionary<string, string>? environment = null, Action<string>? onOutput = null)
    {
        var startInfo = CreateStartInfo(Require(program), arguments, environment, null);
        var process = new Process { StartInfo = startInfo };
        if (onOutput is not null)
        {
            process.OutputDataReceived += (_, e) =>
            {
                if (e.Data is not null)
                {
                    onOutput(e.Data);
                }
            };
            process.ErrorDataReceived += (_, e) =>
            {
                if (e.Data is not null)
                {
                    onOutput(e.Data);
                }
            };
        }

        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    /// <summary>Stops a process started with <see cref="Start"/>, first politely (SIGTERM), then by force.</summary>
    public static async Task StopAsync(Process process, TimeSpan? grace = null)
    {
        if (process.HasExited)
        {
            return;
        }

        _ = Kill(process.Id, 15);
        using var wait = new CancellationTokenSource(grace ?? TimeSpan.FromSeconds(10));
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

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);

    /// <summary>Sends a signal to a process (e.g. 2 for SIGINT, 9 for SIGKILL).</summary>
    public static void Signal(Process process, int signal) => _ = Kill(process.Id, signal);

    /// <summary>Sends a signal to a process known only by its id (a daemon that wrote a pid file).</summary>
    public static void Signal(int pid, int signal) => _ = Kill(pid, signal);

    private static ProcessStartInfo CreateStartInfo(string file, IEnumerable<string> arguments, IDictionary<string, string>? environment, string? workingDirectory)
    {
        var startInfo = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = workingDirectory ?? Environment.CurrentDirectory,
        };
        foreach (var argument in arguments)
        {
            startInfo.ArgumentList.Add(argument);
        }

        // Peers that are Python scripts (nbdsh) must find Debian's python and its nbd module first.
        startInfo.Environment["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        startInfo.Environment["LC_ALL"] = "C";
        if (environment is not null)
        {
            foreach (var (key, value) in environment)
            {
                startInfo.Environment[key] = value;
            }
        }

        return startInfo;
    }
}
