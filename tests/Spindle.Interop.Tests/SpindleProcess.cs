using System.Collections.Concurrent;
using System.Diagnostics;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>The real <c>spindle</c> command run as a separate process, the way a user runs it.</summary>
internal sealed class SpindleProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly ConcurrentQueue<string> _output = new();

    private SpindleProcess(Process process, ConcurrentQueue<string> output)
    {
        _process = process;
        _output = output;
    }

    public Process Process => _process;

    public IReadOnlyCollection<string> Output => _output.ToArray();

    public string? Uri { get; private set; }

    /// <summary>Starts <c>spindle ARGS</c> and, when it serves, waits for the URI it prints (--print-uri).</summary>
    public static async Task<SpindleProcess> StartAsync(params string[] arguments)
    {
        var output = new ConcurrentQueue<string>();
        var process = PeerTool.Start(SpindleExecutable.Path, arguments, onOutput: output.Enqueue);
        var spindle = new SpindleProcess(process, output);
        if (arguments.Contains("--print-uri"))
        {
            spindle.Uri = await spindle.WaitForLineAsync(line => line.StartsWith("nbd", StringComparison.Ordinal), TimeSpan.FromSeconds(30));
        }

        return spindle;
    }

    /// <summary>Runs <c>spindle ARGS</c> to completion.</summary>
    public static Task<ProcessResult> RunAsync(params string[] arguments) =>
        PeerTool.RunAsync(SpindleExecutable.Path, arguments, TimeSpan.FromSeconds(60));

    public async Task<string> WaitForLineAsync(Func<string, bool> predicate, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            var line = _output.FirstOrDefault(predicate);
            if (line is not null)
            {
                return line;
            }

            if (_process.HasExited)
            {
                await Task.Delay(100);
                Assert.Fail($"spindle exited with {_process.ExitCode}:\n{string.Join('\n', _output)}");
            }

            await Task.Delay(20);
        }

        Assert.Fail($"spindle printed no matching line within {timeout.TotalSeconds} s:\n{string.Join('\n', _output)}");
        return string.Empty;
    }

    /// <summary>Sends a signal and waits (boundedly) for the exit code.</summary>
    public async Task<int> StopAsync(int signal = 15, TimeSpan? timeout = null)
    {
        PeerTool.Signal(_process, signal);
        using var wait = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(30));
        await _process.WaitForExitAsync(wait.Token);
        return _process.ExitCode;
    }

    public async ValueTask DisposeAsync()
    {
        await PeerTool.StopAsync(_process);
        _process.Dispose();
    }
}
