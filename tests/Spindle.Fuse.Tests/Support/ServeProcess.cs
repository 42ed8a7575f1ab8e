using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.RegularExpressions;
using Spindle.Fuse.Devices;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests.Support;

/// <summary>
/// <c>spindle serve</c> as a separate process on 127.0.0.1, the way a remote disk is served: killed with SIGKILL and
/// started again on the same port, or told to cut its connections (SIGUSR1). Its output is kept across restarts.
/// </summary>
internal sealed partial class ServeProcess : IAsyncDisposable
{
    private readonly string[] _arguments;
    private readonly List<StringBuilder> _outputs = [];
    private Process? _process;

    private ServeProcess(int port, string[] arguments)
    {
        Port = port;
        _arguments = arguments;
    }

    public int Port { get; }

    /// <summary>The default export of this server.</summary>
    public string Uri => $"nbd://127.0.0.1:{Port}/";

    public bool IsRunning => _process is { HasExited: false };

    /// <summary>Times the server was started again after <see cref="KillAsync"/>.</summary>
    public int Restarts { get; private set; }

    /// <summary>Everything every run of the server printed (standard output and error).</summary>
    public string Output
    {
        get
        {
            var text = new StringBuilder();
            foreach (var output in _outputs)
            {
                lock (output)
                {
                    text.Append(output);
                }
            }

            return text.ToString();
        }
    }

    /// <summary>
    /// Serves <paramref name="image"/> as the default export on 127.0.0.1:<paramref name="port"/> (plus
    /// <paramref name="options"/>) and returns once it listens (it prints its URI then).
    /// </summary>
    public static async Task<ServeProcess> StartAsync(int port, string image, params string[] options)
    {
        var server = new ServeProcess(port, ["serve", "--port", port.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--print-uri", .. options, image]);
        await server.LaunchAsync();
        return server;
    }

    /// <summary>
    /// A free port below the kernel's ephemeral range (32768 and up), so no outgoing connection, such as the client's
    /// own reconnection attempts, can hold it while the server is down between a kill and its restart.
    /// </summary>
    public static int FreePort()
    {
        for (var attempt = 0; attempt < 200; attempt++)
        {
            var candidate = Random.Shared.Next(20_000, 32_000);
            using var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                probe.Bind(new IPEndPoint(IPAddress.Loopback, candidate));
                return candidate;
            }
            catch (SocketException)
            {
            }
        }

        Assert.Fail("no free port between 20000 and 32000 on 127.0.0.1");
        return 0;
    }

    /// <summary>SIGKILL: the server dies with whatever it had in flight; its connections are closed by the kernel.</summary>
    public async Task KillAsync()
    {
        var process = _process ?? throw new InvalidOperationException("the server is not running");
        PeerTool.Signal(process, DaemonProcess.SigKill);
        using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await process.WaitForExitAsync(wait.Token);
    }

    /// <summary>Starts the server again with the same arguments (same port, same image) and waits until it listens.</summary>
    public async Task RestartAsync()
    {
        Assert.False(IsRunning, "the server still runs");
        await LaunchAsync();
        Restarts++;
    }

    /// <summary>SIGSTOP: the server answers nothing (the kernel still accepts what clients send) until killed or continued.</summary>
    public void Freeze() => PeerTool.Signal(_process ?? throw new InvalidOperationException("the server is not running"), 19);

    /// <summary>SIGUSR1: the server closes every client connection at once and keeps listening (a network cut).</summary>
    public void CutConnections() => PeerTool.Signal(_process ?? throw new InvalidOperationException("the server is not running"), 10);

    /// <summary>The connection counts of the SIGUSR1 cuts the server reported so far, in order.</summary>
    public IReadOnlyList<int> ReportedCuts() =>
        [.. CutLine().Matches(Output).Select(match => int.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture))];

    /// <summary>Stops the server gracefully (SIGTERM: in-flight requests answered, the image flushed). Returns its exit code.</summary>
    public async Task<int> StopAsync() => _process is { } process ? await SpindleCli.StopAsync(process) : 0;

    /// <summary>For cleanup after a failure: a server left down (or frozen) is started again (continued) so that a hard mount can flush.</summary>
    public async Task EnsureRunningAsync()
    {
        if (_process is { HasExited: false } process)
        {
            PeerTool.Signal(process, 18);
        }
        else
        {
            try
            {
                await LaunchAsync();
            }
            catch (Exception exception) when (exception is not OutOfMemoryException)
            {
                TestContext.Current.TestOutputHelper?.WriteLine($"could not start the server again for cleanup: {exception.Message}");
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_process is { } process)
        {
            await SpindleCli.StopAsync(process);
            process.Dispose();
            _process = null;
        }
    }

    private async Task LaunchAsync()
    {
        _process?.Dispose();
        _process = null;
        var (process, firstLine, output) = await SpindleCli.StartAsync(_arguments);
        _outputs.Add(output);
        _process = process;
        Assert.Equal(Uri, firstLine);
    }

    [GeneratedRegex(@"SIGUSR1: cut (\d+) client connections")]
    private static partial Regex CutLine();
}
