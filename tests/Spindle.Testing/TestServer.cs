using System.Net;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Storage;

namespace Spindle.Testing;

/// <summary>
/// A Spindle server running inside the test process, listening on 127.0.0.1 with a kernel-chosen port and on a
/// Unix socket in a temporary directory. Disposing it stops it.
/// </summary>
public sealed class TestServer : IAsyncDisposable
{
    private readonly TempDirectory _directory;

    private TestServer(NbdServer server, ExportCatalog catalog, TempDirectory directory, CapturingLoggerProvider logs, string socketPath)
    {
        Server = server;
        Catalog = catalog;
        _directory = directory;
        Logs = logs;
        UnixSocketPath = socketPath;
        Port = server.LocalEndPoints.OfType<IPEndPoint>().First().Port;
    }

    public NbdServer Server { get; }

    public ExportCatalog Catalog { get; }

    public CapturingLoggerProvider Logs { get; }

    public int Port { get; }

    public string UnixSocketPath { get; }

    /// <summary>nbd://127.0.0.1:PORT/EXPORT</summary>
    public string Uri(string export = "") => $"nbd://127.0.0.1:{Port}/{System.Uri.EscapeDataString(export)}";

    /// <summary>nbd+unix:///EXPORT?socket=PATH</summary>
    public string UnixUri(string export = "") => $"nbd+unix:///{System.Uri.EscapeDataString(export)}?socket={UnixSocketPath}";

    public IPEndPoint EndPoint => new(IPAddress.Loopback, Port);

    /// <summary>Starts a server with the exports <paramref name="addExports"/> adds.</summary>
    public static Task<TestServer> StartAsync(Action<ExportCatalog> addExports, Action<ServerOptions>? configure = null)
    {
        ArgumentNullException.ThrowIfNull(addExports);
        var directory = new TempDirectory();
        var socketPath = directory.File("nbd.sock");
        var options = new ServerOptions();
        options.Endpoints.Add(new ListenEndpoint.Tcp(IPAddress.Loopback, 0));
        options.Endpoints.Add(new ListenEndpoint.Unix(socketPath));
        options.ShutdownTimeout = TimeSpan.FromSeconds(5);
        configure?.Invoke(options);
        var catalog = new ExportCatalog();
        addExports(catalog);
        var logs = new CapturingLoggerProvider();
        var server = new NbdServer(options, catalog, logs);
        server.Start();
        return Task.FromResult(new TestServer(server, catalog, directory, logs, socketPath));
    }

    /// <summary>One export named <paramref name="name"/> backed by <paramref name="device"/>.</summary>
    public static Task<TestServer> StartAsync(BlockDevice device, string name = "", bool readOnly = false, Action<ServerOptions>? configure = null, string? description = null) =>
        StartAsync(catalog => catalog.Add(new Export(new ExportOptions { Name = name, ReadOnly = readOnly, Description = description }, device)), configure);

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        await Catalog.DisposeAsync();
        _directory.Dispose();
    }
}
