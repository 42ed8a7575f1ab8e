using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Spindle.Protocol;
using Spindle.Server.Connections;
using Spindle.Server.Diagnostics;
using Spindle.Server.Exports;
using Spindle.Server.Logging;
using Spindle.Wire;

namespace Spindle.Server;

/// <summary>
/// An NBD server: listeners, the exports they serve, and every live connection. Start it, and stop it gracefully:
/// no new connections, in-flight requests answered, exports flushed.
/// </summary>
public sealed class NbdServer : IAsyncDisposable
{
    private readonly List<ConnectionListener> _listeners = [];
    private readonly ConcurrentDictionary<long, (NbdConnection Connection, Task Task)> _connections = new();
    private readonly CancellationTokenSource _stopping = new();
    private readonly CancellationTokenSource _abort = new();
    private readonly Timer? _idleSweep;
    private long _nextConnectionId;
    private int _state; // 0 created, 1 started, 2 stopping, 3 stopped

    public NbdServer(ServerOptions options, ExportCatalog catalog, ILoggerFactory? loggerFactory = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(catalog);
        options.Validate();
        Options = options;
        Catalog = catalog;
        Logger = (loggerFactory ?? NullLoggerFactory.Instance).CreateLogger("Spindle.Server");
        SharedBudget = new FlowBudget(int.MaxValue, options.MaxBytesInFlightTotal);
        ValidateExports();
        Metrics = new ServerMetrics(this);
        if (options.IdleTimeout is { } idle)
        {
            var period = TimeSpan.FromMilliseconds(Math.Clamp(idle.TotalMilliseconds / 4, 50, 1000));
            _idleSweep = new Timer(static state => ((NbdServer)state!).SweepIdle(), this, period, period);
        }
    }

    /// <summary>The payload bytes in flight across all connections (<see cref="ServerOptions.MaxBytesInFlightTotal"/>).</summary>
    internal FlowBudget SharedBudget { get; }

    public ServerOptions Options { get; }

    public ExportCatalog Catalog { get; }

    /// <summary>The endpoints actually bound, port 0 resolved (available after <see cref="Start"/>).</summary>
    public IReadOnlyList<EndPoint> LocalEndPoints => _listeners.Select(l => l.LocalEndPoint).ToArray();

    /// <summary>Connections currently open, in negotiation or transmission.</summary>
    public int ConnectionCount => _connections.Count;

    /// <summary>The server's instruments (meter <see cref="ServerMetrics.MeterName"/>).</summary>
    public ServerMetrics Metrics { get; }

    /// <summary>Every open connection, as a snapshot (for a status page or a control socket).</summary>
    public IReadOnlyList<ConnectionInfo> Connections => [.. ConnectionsNow().OrderBy(c => c.Id).Select(c =>
    {
        var (requests, bytes) = c.InFlight;
        return new ConnectionInfo(c.Id, c.Peer, c.TransportKind, c.Tls, c.TlsIdentity, c.InTransmission ? c.Export?.Name : null, c.ConnectedAt,
            c.Counters, requests, bytes, c.IsDraining);
    })];

    internal IEnumerable<NbdConnection> ConnectionsNow() => _connections.Values.Select(entry => entry.Connection);

    /// <summary>
    /// Disconnects one client the polite way: what it has in flight is finished and answered, new requests get
    /// ESHUTDOWN, then the connection closes (a client still negotiating is closed at once).
    /// </summary>
    /// <returns>False if there is no such connection.</returns>
    public bool Disconnect(long connectionId)
    {
        if (!_connections.TryGetValue(connectionId, out var entry))
        {
            return false;
        }

        entry.Connection.Drain();
        return true;
    }

    /// <summary>Counts a refused client for the metrics (reasons are listed on the <c>spindle.server.refusals</c> instrument).</summary>
    internal void CountRefusal(string reason) => Metrics.Refused(reason);

    internal ILogger Logger { get; }

    /// <summary>Set when a graceful stop begins: stop reading new requests, close idle handshakes.</summary>
    internal CancellationToken StoppingToken => _stopping.Token;

    /// <summary>Set when the stop's patience runs out: cut everything still open.</summary>
    internal CancellationToken AbortToken => _abort.Token;

    internal bool IsStopping => _stopping.IsCancellationRequested;

    /// <summary>Binds every configured endpoint and starts accepting. Throws (and binds nothing) if one cannot be bound.</summary>
    public void Start()
    {
        if (Interlocked.CompareExchange(ref _state, 1, 0) != 0)
        {
            throw new InvalidOperationException("the server was already started");
        }

        var endpoints = Options.Endpoints.Count > 0 ? Options.Endpoints : [ListenEndpoint.AnyAddress()];
        try
        {
            foreach (var endpoint in endpoints)
            {
                _listeners.Add(ConnectionListener.Bind(endpoint, this));
            }
        }
        catch
        {
            foreach (var listener in _listeners)
            {
                listener.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }

            _listeners.Clear();
            throw;
        }

        foreach (var listener in _listeners)
        {
            listener.Start();
        }
    }

    /// <summary>
    /// Serves one already-connected transport (an accepted socket, an in-memory stream). Completes when the
    /// connection ends; never throws for anything the client does.
    /// </summary>
    public Task ServeAsync(Transport transport)
    {
        ArgumentNullException.ThrowIfNull(transport);
        var id = Interlocked.Increment(ref _nextConnectionId);
        var connection = new NbdConnection(this, transport, id);
        if (IsStopping)
        {
            connection.Abort();
            return connection.DisposeAsync().AsTask();
        }

        var run = transport.RunAsync(connection.RunAsync, $"nbd-connection-{id}");
        _connections[id] = (connection, run);
        _ = run.ContinueWith(static (_, state) =>
        {
            var (server, connectionId) = ((NbdServer, long))state!;
            server._connections.TryRemove(connectionId, out var _);
        }, (this, id), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        return run;
    }

    private void ValidateExports()
    {
        foreach (var export in Catalog.Exports)
        {
            if (export.Options.Tls == Security.TlsMode.Require && Options.Tls is null)
            {
                throw new ArgumentException($"export '{export.Name}' requires TLS but the server has no certificate configured");
            }

            if (export.Options.Access?.Identities is not null && Options.Tls?.ClientCertificateAuthorities is null)
            {
                throw new ArgumentException($"export '{export.Name}' allows TLS identities but the server verifies no client certificates (it needs a ca-cert.pem)");
            }
        }
    }

    private void SweepIdle()
    {
        var timeout = Options.IdleTimeout!.Value;
        var now = Environment.TickCount64;
        foreach (var (connection, _) in _connections.Values)
        {
            if (connection.IsQuiet && now - connection.LastActivity > (long)timeout.TotalMilliseconds)
            {
                connection.CloseIdle(timeout);
            }
        }
    }

    internal void Accept(Socket socket)
    {
        var transport = socket.AddressFamily == AddressFamily.Unix ? "unix" : "tcp";
        if (_connections.Count >= Options.MaxConnections || IsStopping)
        {
            CountRefusal(IsStopping ? "shutting_down" : "max_connections");
            ServerLog.TooManyConnections(Logger, socket.RemoteEndPoint?.ToString() ?? "unix", Options.MaxConnections);
            socket.Dispose();
            return;
        }

        Metrics.Accepted(transport);
        _ = ServeAsync(new SocketTransport(socket, blocking: Options.BlockingSockets));
    }

    /// <summary>
    /// Cuts every client connection at once, as a network failure would (the server keeps listening). For testing
    /// clients that must survive it, and for an operator who needs every client to reconnect.
    /// </summary>
    public int DisconnectAll()
    {
        var count = 0;
        foreach (var (connection, _) in _connections.Values)
        {
            connection.Abort();
            count++;
        }

        return count;
    }

    /// <summary>
    /// Stops gracefully: closes the listeners, lets every connection finish the requests it has in flight (new ones are
    /// not read), flushes every writable export, and after <see cref="ServerOptions.ShutdownTimeout"/> cuts what is left.
    /// </summary>
    public async Task StopAsync()
    {
        if (Interlocked.Exchange(ref _state, 2) >= 2)
        {
            return;
        }

        await _stopping.CancelAsync().ConfigureAwait(false);
        foreach (var listener in _listeners)
        {
            await listener.DisposeAsync().ConfigureAwait(false);
        }

        _listeners.Clear();
        ServerLog.ShuttingDown(Logger, _connections.Count);
        var pending = _connections.Values.Select(c => c.Task).ToArray();
        var all = Task.WhenAll(pending);
        if (await Task.WhenAny(all, Task.Delay(Options.ShutdownTimeout)).ConfigureAwait(false) != all)
        {
            ServerLog.ShutdownTimedOut(Logger, _connections.Count);
            await _abort.CancelAsync().ConfigureAwait(false);
            foreach (var (connection, _) in _connections.Values)
            {
                connection.Abort();
            }

            await Task.WhenAny(all, Task.Delay(TimeSpan.FromSeconds(5))).ConfigureAwait(false);
        }

        foreach (var export in Catalog.Exports)
        {
            if (export.IsReadOnly || (export.FlagsFor(false) & TransmissionFlags.SendFlush) == 0)
            {
                continue;
            }

            try
            {
                await export.Device.FlushAsync(CancellationToken.None).ConfigureAwait(false);
            }
            catch (Exception exception)
            {
                ServerLog.ShutdownFlushFailed(Logger, export.Name, exception);
            }
        }

        Interlocked.Exchange(ref _state, 3);
    }

    public async ValueTask DisposeAsync()
    {
        if (_idleSweep is not null)
        {
            await _idleSweep.DisposeAsync().ConfigureAwait(false);
        }

        await StopAsync().ConfigureAwait(false);
        Metrics.Dispose();
        _stopping.Dispose();
        _abort.Dispose();
    }
}
