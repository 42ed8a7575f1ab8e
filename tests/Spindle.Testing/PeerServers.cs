using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Xunit;

namespace Spindle.Testing;

/// <summary>
/// A real NBD server started for a test (nbdkit, nbd-server, qemu-nbd), listening on 127.0.0.1 with a free port or
/// on a Unix socket in a temporary directory. Disposing it stops it (the process tree, or the daemon by its pid
/// file) and removes the directory.
/// </summary>
public sealed class PeerServer : IAsyncDisposable
{
    private static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(20);

    private readonly Process? _process;
    private readonly string? _pidFile;
    private readonly StringBuilder _output;

    private PeerServer(string name, Process? process, string? pidFile, TempDirectory directory, StringBuilder output, int? port, string? socket)
    {
        Name = name;
        _process = process;
        _pidFile = pidFile;
        Directory = directory;
        _output = output;
        Port = port;
        SocketPath = socket;
    }

    public string Name { get; }

    public TempDirectory Directory { get; }

    public int? Port { get; }

    public string? SocketPath { get; }

    /// <summary>What the server printed so far (for failure messages).</summary>
    public string Output
    {
        get
        {
            lock (_output)
            {
                return _output.ToString();
            }
        }
    }

    /// <summary>The NBD URI of <paramref name="export"/> on this server.</summary>
    public string Uri(string export = "") => SocketPath is not null
        ? $"nbd+unix:///{System.Uri.EscapeDataString(export)}?socket={SocketPath}"
        : $"nbd://127.0.0.1:{Port}/{System.Uri.EscapeDataString(export)}";

    /// <summary>
    /// nbdkit in the foreground: <c>nbdkit -f --exit-with-parent [-U sock | -i 127.0.0.1 -p port] ARGS</c>, for
    /// example <c>["memory", "64M"]</c> or <c>["--no-sr", "file", path]</c>.
    /// </summary>
    /// <remarks>Give <paramref name="port"/> to start it again where a client expects it (a restarted server).</remarks>
    public static Task<PeerServer> StartNbdkitAsync(IEnumerable<string> arguments, bool unix = false, int? port = null)
    {
        var directory = new TempDirectory();
        var socket = unix ? directory.File("nbdkit.sock") : null;
        port = unix ? null : port ?? FreePort();
        var listen = unix ? new[] { "-U", socket! } : ["-i", "127.0.0.1", "-p", port!.Value.ToString(System.Globalization.CultureInfo.InvariantCulture)];
        return LaunchAsync("nbdkit", ["-f", "--exit-with-parent", .. listen, .. arguments], directory, port, socket, pidFile: null);
    }

    /// <summary>
    /// qemu-nbd in the foreground, persistent, up to 8 clients: <c>qemu-nbd -t -e 8 [-k sock | -b 127.0.0.1 -p port] ARGS</c>.
    /// </summary>
    public static Task<PeerServer> StartQemuNbdAsync(IEnumerable<string> arguments, bool unix = false)
    {
        var directory = new TempDirectory();
        var socket = unix ? directory.File("qemu-nbd.sock") : null;
        var port = unix ? (int?)null : FreePort();
        var listen = unix ? new[] { "-k", socket! } : ["-b", "127.0.0.1", "-p", port!.Value.ToString(System.Globalization.CultureInfo.InvariantCulture)];
        return LaunchAsync("qemu-nbd", ["-t", "-e", "8", .. listen, .. arguments], directory, port, socket, pidFile: null);
    }

    /// <summary>
    /// Debian's nbd-server (3.24) with a generated configuration: one section per export, listening on 127.0.0.1.
    /// It daemonizes and forks a child per client, so it is stopped through its pid file (SIGTERM, which also ends
    /// the children). <paramref name="exports"/> maps export names to their configuration lines.
    /// </summary>
    public static Task<PeerServer> StartNbdServerAsync(IReadOnlyDictionary<string, string[]> exports, bool allowList = true)
    {
        var directory = new TempDirectory();
        var port = FreePort();
        var pidFile = directory.File("nbd-server.pid");
        var config = new StringBuilder();
        config.AppendLine("[generic]");
        config.AppendLine(System.FormattableString.Invariant($"    port = {port}"));
        config.AppendLine("    listenaddr = 127.0.0.1");
        config.AppendLine(allowList ? "    allowlist = true" : "    allowlist = false");
        foreach (var (name, lines) in exports)
        {
            config.AppendLine($"[{name}]");
            foreach (var line in lines)
            {
                config.AppendLine("    " + line);
            }
        }

        var configPath = directory.File("config");
        File.WriteAllText(configPath, config.ToString());
        return LaunchAsync("nbd-server", ["-C", configPath, "-p", pidFile], directory, port, null, pidFile);
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (_pidFile is not null && File.Exists(_pidFile) &&
                int.TryParse(File.ReadAllText(_pidFile).Trim(), out var pid))
            {
                PeerTool.Signal(pid, 15);
                await WaitForExitAsync(pid, TimeSpan.FromSeconds(10));
            }

            if (_process is not null)
            {
                if (!_process.HasExited)
                {
                    await PeerTool.StopAsync(_process);
                }

                _process.Dispose();
            }
        }
        finally
        {
            Directory.Dispose();
        }
    }

    /// <summary>A TCP port nobody listens on right now (the kernel's choice for port 0).</summary>
    public static int FreePort()
    {
        using var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        return ((IPEndPoint)probe.LocalEndPoint!).Port;
    }

    private static async Task<PeerServer> LaunchAsync(string program, string[] arguments, TempDirectory directory, int? port, string? socket, string? pidFile)
    {
        var output = new StringBuilder();
        var process = PeerTool.Start(program, arguments, onOutput: line =>
        {
            lock (output)
            {
                output.AppendLine(line);
            }
        });
        var server = new PeerServer(program, process, pidFile, directory, output, port, socket);
        try
        {
            await WaitUntilListeningAsync(server, process, daemonizes: pidFile is not null);
            return server;
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
    }

    private static async Task WaitUntilListeningAsync(PeerServer server, Process process, bool daemonizes)
    {
        var watch = Stopwatch.StartNew();
        while (watch.Elapsed < StartTimeout)
        {
            // A daemon's launcher exits at once (that is fine); a foreground server must not.
            if (!daemonizes && process.HasExited)
            {
                Assert.Fail($"{server.Name} exited with {process.ExitCode} before listening:\n{server.Output}");
            }

            if (await CanConnectAsync(server))
            {
                return;
            }

            await Task.Delay(50);
        }

        Assert.Fail($"{server.Name} did not listen within {StartTimeout.TotalSeconds} s:\n{server.Output}");
    }

    private static async Task<bool> CanConnectAsync(PeerServer server)
    {
        using var socket = server.SocketPath is not null
            ? new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified)
            : new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        EndPoint endpoint = server.SocketPath is not null
            ? new UnixDomainSocketEndPoint(server.SocketPath)
            : new IPEndPoint(IPAddress.Loopback, server.Port!.Value);
        using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(2));
        try
        {
            await socket.ConnectAsync(endpoint, limit.Token);

            // Read the greeting so the server sees a polite client, not a half-open probe it logs as an error.
            var greeting = new byte[18];
            await socket.ReceiveAsync(greeting, SocketFlags.None, limit.Token);
            return true;
        }
        catch (Exception exception) when (exception is SocketException or OperationCanceledException)
        {
            return false;
        }
    }

    private static async Task WaitForExitAsync(int pid, TimeSpan timeout)
    {
        var watch = Stopwatch.StartNew();
        while (watch.Elapsed < timeout && System.IO.Directory.Exists($"/proc/{pid}") && !IsZombie(pid))
        {
            await Task.Delay(20);
        }

        if (System.IO.Directory.Exists($"/proc/{pid}") && !IsZombie(pid))
        {
            PeerTool.Signal(pid, 9);
        }
    }

    private static bool IsZombie(int pid)
    {
        try
        {
            var status = File.ReadAllText($"/proc/{pid}/stat");
            var close = status.LastIndexOf(')');
            return close > 0 && close + 2 < status.Length && status[close + 2] == 'Z';
        }
        catch (IOException)
        {
            return true;
        }
    }
}
