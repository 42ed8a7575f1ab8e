using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>
/// A real <c>spindle serve</c> process for the operations tests: a configuration file, a free port on 127.0.0.1, and
/// optionally a metrics endpoint and a control socket. Its output is kept for assertions on logs.
/// </summary>
internal sealed class OpsServer : IAsyncDisposable
{
    private readonly ConcurrentQueue<string> _output;

    private OpsServer(Process process, ConcurrentQueue<string> output, TempDirectory directory, int port, int? metricsPort)
    {
        Process = process;
        _output = output;
        Directory = directory;
        Port = port;
        MetricsPort = metricsPort;
    }

    public Process Process { get; }

    public TempDirectory Directory { get; }

    public int Port { get; }

    public int? MetricsPort { get; }

    public string ConfigFile => Directory.File("spindle.conf");

    public string ControlSocket => Directory.File("control.sock");

    public IReadOnlyCollection<string> Output => _output.ToArray();

    public string Uri(string export) => $"nbd://127.0.0.1:{Port}/{export}";

    /// <summary>A free TCP port on 127.0.0.1 (bound and released: the server binds it right after).</summary>
    public static int FreePort()
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        socket.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        return ((IPEndPoint)socket.LocalEndPoint!).Port;
    }

    /// <summary>The [generic] section every test server has (loopback only), then <paramref name="exports"/>.</summary>
    public static string Config(int port, string exports, string generic = "") =>
        $"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n{generic}\n{exports}\n";

    /// <summary>Starts spindle serve with <paramref name="exports"/> (configuration sections) and waits until it listens.</summary>
    public static async Task<OpsServer> StartAsync(string exports, bool metrics = false, bool control = true, string generic = "", IDictionary<string, string>? environment = null, TempDirectory? directory = null, params string[] extra)
    {
        directory ??= new TempDirectory();
        var port = FreePort();
        int? metricsPort = metrics ? FreePort() : null;
        var configuration = Config(port, exports.Replace("$DIR", directory.Path, StringComparison.Ordinal), generic);
        await File.WriteAllTextAsync(directory.File("spindle.conf"), configuration);
        var arguments = new List<string> { "serve", "--config", directory.File("spindle.conf") };
        if (metrics)
        {
            arguments.AddRange(["--metrics", $"127.0.0.1:{metricsPort}"]);
        }

        if (control)
        {
            arguments.AddRange(["--control", directory.File("control.sock")]);
        }

        arguments.AddRange(extra);
        var output = new ConcurrentQueue<string>();
        var process = PeerTool.Start(SpindleExecutable.Path, arguments, environment, output.Enqueue);
        var server = new OpsServer(process, output, directory, port, metricsPort);
        await server.WaitForLogAsync("Clients connect to", TimeSpan.FromSeconds(30));
        return server;
    }

    /// <summary>Waits for a log line containing <paramref name="text"/> (the n-th one with <paramref name="occurrence"/>).</summary>
    public async Task<string> WaitForLogAsync(string text, TimeSpan timeout, int occurrence = 1)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            var matches = _output.Where(line => line.Contains(text, StringComparison.Ordinal)).ToList();
            if (matches.Count >= occurrence)
            {
                return matches[occurrence - 1];
            }

            if (Process.HasExited)
            {
                await Task.Delay(100);
                Assert.Fail($"spindle exited with {Process.ExitCode} before logging '{text}':\n{string.Join('\n', _output)}");
            }

            await Task.Delay(20);
        }

        Assert.Fail($"spindle did not log '{text}' within {timeout.TotalSeconds} s:\n{string.Join('\n', _output)}");
        return string.Empty;
    }

    public int Count(string text) => _output.Count(line => line.Contains(text, StringComparison.Ordinal));

    /// <summary>Runs <c>spindle ctl --socket ... ARGS</c>.</summary>
    public Task<ProcessResult> CtlAsync(params string[] arguments) =>
        PeerTool.RunAsync(SpindleExecutable.Path, new[] { "ctl", "--socket", ControlSocket }.Concat(arguments), TimeSpan.FromSeconds(60));

    /// <summary>Runs <c>spindle ctl --json ARGS</c> and parses the answer.</summary>
    public async Task<JsonDocument> CtlJsonAsync(params string[] arguments)
    {
        var result = await PeerTool.RunAsync(SpindleExecutable.Path, new[] { "ctl", "--socket", ControlSocket, "--json" }.Concat(arguments), TimeSpan.FromSeconds(60));
        Assert.True(result.ExitCode == 0, result.ToString());
        return JsonDocument.Parse(result.StandardOutput);
    }

    /// <summary>GET on the metrics endpoint.</summary>
    public async Task<string> HttpGetAsync(string path)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(30) };
        return await http.GetStringAsync(new System.Uri($"http://127.0.0.1:{MetricsPort}{path}"));
    }

    public void Signal(int signal) => PeerTool.Signal(Process, signal);

    public async Task<int> StopAsync()
    {
        Signal(15);
        using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await Process.WaitForExitAsync(wait.Token);
        return Process.ExitCode;
    }

    public async ValueTask DisposeAsync()
    {
        await PeerTool.StopAsync(Process);
        Process.Dispose();
        Directory.Dispose();
    }
}
