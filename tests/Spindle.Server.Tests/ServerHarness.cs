using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Spindle.Wire;

namespace Spindle.Server.Tests;

/// <summary>
/// A server with no sockets: each client talks to it over an in-memory stream pair. Exports: "" and "mem" (a 16 MiB
/// memory disk shared by both names), "ro" (read-only memory disk holding a pattern), plus whatever a test adds.
/// </summary>
internal sealed class ServerHarness : IAsyncDisposable
{
    public const long MemorySize = 16 * 1024 * 1024;

    private readonly List<Task> _connections = [];

    public ServerHarness(Action<ServerOptions>? configure = null, Action<ExportCatalog>? addExports = null, bool sockets = false)
    {
        UsesSockets = sockets;
        Options = new ServerOptions { ShutdownTimeout = TimeSpan.FromSeconds(5) };
        if (sockets)
        {
            Options.Endpoints.Add(new ListenEndpoint.Tcp(System.Net.IPAddress.Loopback, 0));
        }

        configure?.Invoke(Options);
        Memory = new MemoryBlockDevice(MemorySize);
        ReadOnlyDevice = new MemoryBlockDevice(1024 * 1024);
        ReadOnlyDevice.WriteAsync(0, Patterns.Generate(0, 1024 * 1024), fua: false, CancellationToken.None).AsTask().Wait();
        Catalog = new ExportCatalog { DefaultExportName = "mem" };
        Catalog.Add(new Export(new ExportOptions { Name = "mem", Description = "a memory disk" }, Memory));
        Catalog.Add(new Export(new ExportOptions { Name = "ro", ReadOnly = true }, ReadOnlyDevice));
        addExports?.Invoke(Catalog);
        Server = new NbdServer(Options, Catalog, Logs);
        if (sockets)
        {
            Server.Start();
        }
    }

    /// <summary>
    /// True: clients connect over loopback TCP (blocking sockets, a thread per connection, sendmsg); false: over
    /// in-memory streams (the asynchronous path).
    /// </summary>
    public bool UsesSockets { get; }

    /// <summary>How log lines name this harness's clients.</summary>
    public string PeerName => UsesSockets ? "127.0.0.1" : "memory-peer";

    public ServerOptions Options { get; }

    public ExportCatalog Catalog { get; }

    public MemoryBlockDevice Memory { get; }

    public MemoryBlockDevice ReadOnlyDevice { get; }

    public CapturingLoggerProvider Logs { get; } = new();

    public NbdServer Server { get; }

    /// <summary>A raw client connected over memory or TCP; the handshake has not started.</summary>
    public RawNbdClient Connect()
    {
        if (UsesSockets)
        {
            var endpoint = (System.Net.IPEndPoint)Server.LocalEndPoints[0];
            return RawNbdClient.ConnectAsync(endpoint).GetAwaiter().GetResult();
        }

        var (client, server) = InMemoryDuplex.CreatePair();
        lock (_connections)
        {
            _connections.Add(Server.ServeAsync(new StreamTransport(server, "memory-peer")));
        }

        return new RawNbdClient(client) { Timeout = TimeSpan.FromSeconds(10) };
    }

    /// <summary>A client that has negotiated structured replies, base:allocation and GO on <paramref name="export"/>.</summary>
    public async Task<(RawNbdClient Client, ulong Size, TransmissionFlags Flags)> OpenAsync(string export = "mem", bool structured = true)
    {
        var client = Connect();
        var (size, flags) = await client.NegotiateAsync(export, structured, blockStatus: structured);
        return (client, size, flags);
    }

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        Task[] connections;
        lock (_connections)
        {
            connections = [.. _connections];
        }

        await Task.WhenAny(Task.WhenAll(connections), Task.Delay(TimeSpan.FromSeconds(10)));
        await Catalog.DisposeAsync();
    }
}
