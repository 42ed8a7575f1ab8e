using System.Diagnostics;
using System.Net.Sockets;
using System.Threading.Channels;
using Microsoft.Extensions.Logging;
using Spindle.Client.Negotiation;
using Spindle.Protocol;
using Spindle.Wire;

namespace Spindle.Client.Connection;

/// <summary>
/// One NBD connection in transmission: a cookie-to-request map, one writer loop that sends requests in batches
/// (headers and write payloads gathered into one sendmsg) and one reader loop that matches replies to requests by
/// cookie, in whatever order they come. It knows nothing of reconnection: when it fails it hands every
/// unacknowledged request to its owner (<see cref="Failed"/>), which decides whether to fail or replay them.
/// </summary>
/// <remarks>
/// The split follows StackExchange.Redis's PhysicalConnection (one socket) and PhysicalBridge (the logical link);
/// here the logical side is <see cref="NbdClient"/>.
/// </remarks>
internal sealed partial class NbdConnection : IAsyncDisposable
{
    private readonly Transport _transport;
    private readonly ReceiveBuffer _receive;
    private readonly ILogger _logger;
    private readonly NbdClientOptions _options;
    private readonly Dictionary<ulong, NbdOperation> _pending = [];
    private readonly Lock _pendingLock = new();
    private readonly Channel<NbdOperation> _sendQueue = Channel.CreateUnbounded<NbdOperation>(new UnboundedChannelOptions
    {
        SingleReader = true,
        AllowSynchronousContinuations = false,
    });

    private readonly Dictionary<uint, string> _contextNames;
    private readonly CancellationTokenSource _stopping = new();
    private Task _readLoop = Task.CompletedTask;
    private Task _writeLoop = Task.CompletedTask;
    private Timer? _timeoutTimer;
    private ulong _lastCookie;
    private int _inFlight;
    private int _freeSlots;
    private long _busySince;
    private Exception? _failure;
    private bool _closing;
    private string? _closeReason;
    private TaskCompletionSource? _drained;
    private int _disposed;

    private NbdConnection(int id, Transport transport, ReceiveBuffer receive, ExportInfo export, NbdClientOptions options, ILogger logger)
    {
        Id = id;
        _transport = transport;
        _receive = receive;
        Export = export;
        _options = options;
        _logger = logger;
        _freeSlots = options.MaxRequestsInFlight;
        _contextNames = export.MetaContexts.ToDictionary(pair => pair.Value, pair => pair.Key);
    }

    /// <summary>
    /// Called once when the connection fails or closes, with every request that had no reply yet (the owner fails
    /// them or sends them again elsewhere, once <see cref="Stopped"/> says this connection no longer touches them).
    /// </summary>
    public Action<NbdConnection, IReadOnlyList<NbdOperation>, NbdConnectionException>? Failed { get; set; }

    /// <summary>Called when a request slot frees up (a request was answered), so the owner can send a waiting one.</summary>
    public Action<NbdConnection>? SlotFreed { get; set; }

    /// <summary>
    /// When set, a request the server answered with ESHUTDOWN (it is going away) is handed here to be sent again
    /// elsewhere instead of failing; without it the caller gets the server's error.
    /// </summary>
    public Action<NbdConnection, NbdOperation>? ShutdownReply { get; set; }

    /// <summary>Completes when the reader and writer loops have ended: the connection touches no request any more.</summary>
    public Task Stopped => Task.WhenAll(_readLoop, _writeLoop);

    /// <summary>Requests that may still be submitted before the connection is full.</summary>
    public int FreeSlots => Volatile.Read(ref _freeSlots);

    /// <summary>A small number identifying the connection in logs (0 for the first of a client).</summary>
    public int Id { get; }

    /// <summary>Which of its client's paths (server addresses) the connection belongs to.</summary>
    public int PathIndex { get; set; }

    public ExportInfo Export { get; }

    public string Server => _transport.RemoteDescription;

    /// <summary>Requests submitted and not yet answered.</summary>
    public int InFlight => Volatile.Read(ref _inFlight);

    /// <summary>Why the connection failed, or null while it works.</summary>
    public Exception? Failure => Volatile.Read(ref _failure);

    /// <summary>True while new requests may be submitted: not failed and not closing.</summary>
    public bool IsAvailable
    {
        get
        {
            lock (_pendingLock)
            {
                return _failure is null && !_closing;
            }
        }
    }

    /// <summary>Why the connection stopped taking requests (failed, closing, the server shutting down), or null.</summary>
    public string? UnavailableReason
    {
        get
        {
            lock (_pendingLock)
            {
                return _failure?.Message ?? _closeReason ?? (_closing ? $"the connection to {Server} is closing" : null);
            }
        }
    }

    /// <summary>
    /// Opens a socket to <paramref name="uri"/>, negotiates (TLS first for an nbds URI) and starts the transmission
    /// loops.
    /// </summary>
    public static async Task<NbdConnection> ConnectAsync(NbdUri uri, NbdClientOptions options, int id, ILogger logger, CancellationToken cancellationToken)
    {
        // Certificate files are read before the network is touched, so their problems are reported as such.
        var tls = uri.RequiresTls ? ClientTls.Resolve(uri, options.Tls) : null;
        var transport = options.ConnectTransport is { } connect
            ? await connect(uri, cancellationToken).ConfigureAwait(false)
            : await TransportConnector.ConnectAsync(uri, options.ConnectTimeout, cancellationToken).ConfigureAwait(false);
        var receive = new ReceiveBuffer(transport, ReceiveBufferOptions.Client);
        var negotiator = new ClientNegotiator(transport, receive, logger);
        try
        {
            var export = await HandshakeAsync(negotiator, options.HandshakeTimeout,
                (negotiator, token) => NegotiateAsync(negotiator, uri.ExportName, options, tls, token), cancellationToken).ConfigureAwait(false);
            var connection = new NbdConnection(id, negotiator.Transport, receive, export, options, logger);
            ClientLog.Negotiated(logger, id, transport.RemoteDescription, uri.ExportName, export.Size, export.Flags, export.Method,
                export.StructuredReplies, export.ExtendedHeaders, export.MetaContexts.Count == 0 ? "none" : string.Join(", ", export.MetaContexts.Keys));
            connection.Start();
            return connection;
        }
        catch
        {
            receive.Dispose();
            await negotiator.Transport.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>
    /// Runs a negotiation under the handshake timeout, turning transport failures into
    /// <see cref="NbdConnectionException"/>s that name the server and the moment.
    /// </summary>
    internal static async Task<T> HandshakeAsync<T>(ClientNegotiator negotiator, TimeSpan timeout,
        Func<ClientNegotiator, CancellationToken, Task<T>> negotiate, CancellationToken cancellationToken)
    {
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (timeout != Timeout.InfiniteTimeSpan)
        {
            deadline.CancelAfter(timeout);
        }

        var server = negotiator.Transport.RemoteDescription;
        try
        {
            return await negotiate(negotiator, deadline.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new NbdConnectionException($"{server} did not complete the NBD handshake within {timeout.TotalSeconds:0.#} s");
        }
        catch (EndOfStreamException exception)
        {
            throw new NbdConnectionException($"{server} closed the connection during the handshake: {exception.Message}{TlsHint(negotiator)}", exception);
        }
        catch (Exception exception) when (exception is SocketException or (IOException and not NbdException) or ObjectDisposedException)
        {
            throw new NbdConnectionException($"connection to {server} failed during the handshake: {exception.Message}{TlsHint(negotiator)}", exception);
        }
    }

    /// <summary>A server that verifies clients ends the connection right after a TLS 1.3 handshake when it has no certificate it likes.</summary>
    private static string TlsHint(ClientNegotiator negotiator) => negotiator.IsTls
        ? " (right after the TLS handshake: the server may want a client certificate, DIR/client-cert.pem with client-key.pem, or have rejected the one given)"
        : string.Empty;

    /// <summary>The option haggling of a client that wants to enter transmission on <paramref name="exportName"/>.</summary>
    internal static async Task<ExportInfo> NegotiateAsync(ClientNegotiator negotiator, string exportName, NbdClientOptions options, ClientTls? tls, CancellationToken cancellationToken)
    {
        await negotiator.StartAsync(cancellationToken).ConfigureAwait(false);
        if (tls is not null)
        {
            await negotiator.StartTlsAsync(tls, cancellationToken).ConfigureAwait(false);
        }

        var fixedNewstyle = negotiator.FixedNewstyle;
        var structured = false;
        IReadOnlyList<string>? available = null;
        var contexts = new Dictionary<string, uint>(StringComparer.Ordinal);
        if (fixedNewstyle && options.StructuredReplies)
        {
            // Extended headers first: they take precedence over structured replies and imply them.
            structured = (options.ExtendedHeaders && options.UseGo && await negotiator.RequestExtendedHeadersAsync(cancellationToken).ConfigureAwait(false))
                || await negotiator.RequestStructuredRepliesAsync(cancellationToken).ConfigureAwait(false);
        }

        if (structured && options.ListMetaContexts)
        {
            var offered = await negotiator.MetaContextAsync(NbdOption.ListMetaContext, exportName, [], cancellationToken).ConfigureAwait(false);
            available = [.. offered.Keys.Order(StringComparer.Ordinal)];
        }

        if (structured && options.MetaContexts.Count > 0)
        {
            contexts = await negotiator.MetaContextAsync(NbdOption.SetMetaContext, exportName, [.. options.MetaContexts], cancellationToken).ConfigureAwait(false);
        }

        var identity = fixedNewstyle && options.DiscoverIdentity
            ? await negotiator.DiscoverIdentityAsync(exportName, structured, cancellationToken).ConfigureAwait(false)
            : null;

        InfoResult? info = null;
        var method = NegotiationMethod.Go;
        if (fixedNewstyle && options.UseGo)
        {
            // A null answer is NBD_REP_ERR_UNSUP: a server from before GO; EXPORT_NAME follows.
            info = await negotiator.InfoOrGoAsync(NbdOption.Go, exportName, cancellationToken).ConfigureAwait(false);
        }

        if (info is null)
        {
            method = NegotiationMethod.ExportName;
            info = await negotiator.ExportNameAsync(exportName, cancellationToken).ConfigureAwait(false);
        }

        return BuildExportInfo(exportName, info, negotiator, structured, contexts, available, method, options.MaxPayload) with { Identity = identity };
    }

    internal static ExportInfo BuildExportInfo(string exportName, InfoResult info, ClientNegotiator negotiator, bool structured,
        IReadOnlyDictionary<string, uint> contexts, IReadOnlyList<string>? available, NegotiationMethod method, int maxPayload)
    {
        var minimum = info.BlockSizes?.Minimum ?? 1;
        var maximum = Math.Min(info.BlockSizes?.Maximum ?? (uint)maxPayload, (uint)maxPayload);
        maximum -= maximum % minimum;
        return new ExportInfo
        {
            Name = exportName,
            CanonicalName = info.CanonicalName,
            Description = info.Description,
            Size = info.Size,
            RawFlags = info.Flags,
            Flags = ExportInfo.Sanitize(info.Flags, structured, negotiator.ExtendedHeaders),
            AdvertisedBlockSizes = info.BlockSizes,
            MaximumPayload = (int)Math.Max(maximum, minimum),
            HandshakeFlags = negotiator.ServerFlags,
            Method = method,
            StructuredReplies = structured,
            ExtendedHeaders = negotiator.ExtendedHeaders,
            MetaContexts = contexts,
            AvailableMetaContexts = available,
            Tls = negotiator.IsTls,
        };
    }

    /// <summary>Takes a request slot if one is free; the caller then <see cref="Submit"/>s exactly one request.</summary>
    public bool TryReserveSlot()
    {
        var free = Volatile.Read(ref _freeSlots);
        while (free > 0)
        {
            var seen = Interlocked.CompareExchange(ref _freeSlots, free - 1, free);
            if (seen == free)
            {
                return true;
            }

            free = seen;
        }

        return false;
    }

    /// <summary>
    /// Sends <paramref name="operation"/> in a slot taken with <see cref="TryReserveSlot"/>. Its reply, or the
    /// connection's failure, completes it. False (and the slot is given back) if the connection has failed or is
    /// closing: the caller sends the request elsewhere.
    /// </summary>
    public bool Submit(NbdOperation operation)
    {
        lock (_pendingLock)
        {
            if (_failure is not null || _closing)
            {
                Interlocked.Increment(ref _freeSlots);
                return false;
            }

            if (_pending.Count == 0)
            {
                _busySince = Stopwatch.GetTimestamp();
            }

            operation.Cookie = ++_lastCookie;
            _pending.Add(operation.Cookie, operation);
            _inFlight++;
        }

        // If the connection fails right now the channel refuses the write; the failure path already owns the operation.
        _sendQueue.Writer.TryWrite(operation);
        return true;
    }

    /// <summary>
    /// Closes gracefully: waits (up to the disconnect timeout) for requests in flight, sends NBD_CMD_DISC and waits
    /// briefly for the server to close its side. A failed connection is just closed.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        Task drained;
        lock (_pendingLock)
        {
            _closing = true;
            drained = _pending.Count == 0 || _failure is not null
                ? Task.CompletedTask
                : (_drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task;
        }

        if (Failure is null)
        {
            await WaitQuietly(drained, _options.DisconnectTimeout).ConfigureAwait(false);
            _sendQueue.Writer.TryComplete();
            await WaitQuietly(_writeLoop, TimeSpan.FromSeconds(5)).ConfigureAwait(false);
            if (Failure is null && InFlight == 0)
            {
                try
                {
                    // NBD_CMD_DISC: no reply; the server finishes what is in flight and closes.
                    var disconnect = new byte[NbdLimits.RequestHeaderLength];
                    new NbdRequest(CommandFlags.None, NbdCommand.Disconnect, ++_lastCookie, 0, 0).WriteTo(disconnect);
                    using var sendLimit = new CancellationTokenSource(TimeSpan.FromSeconds(5));
                    await _transport.SendAsync(disconnect, sendLimit.Token).ConfigureAwait(false);
                    await _transport.ShutdownSendAsync().ConfigureAwait(false);
                    await WaitQuietly(_readLoop, TimeSpan.FromSeconds(2)).ConfigureAwait(false);
                }
                catch (Exception exception) when (exception is SocketException or IOException or OperationCanceledException or ObjectDisposedException)
                {
                    // The server is gone already; closing is all that is left.
                }
            }
        }

        _stopping.Cancel();
        _sendQueue.Writer.TryComplete();
        if (!_readLoop.IsCompleted)
        {
            // The server has not closed its side after DISC (or this is no graceful close): cut it.
            _transport.Abort();
        }

        await WaitQuietly(_readLoop, TimeSpan.FromSeconds(5)).ConfigureAwait(false);
        await WaitQuietly(_writeLoop, TimeSpan.FromSeconds(5)).ConfigureAwait(false);
        Fail(new NbdConnectionException(_closeReason ?? $"the connection to {Server} was closed by the client"));
        if (_timeoutTimer is not null)
        {
            await _timeoutTimer.DisposeAsync().ConfigureAwait(false);
        }

        await _transport.DisposeAsync().ConfigureAwait(false);
        if (_readLoop.IsCompleted)
        {
            _receive.Dispose();
        }

        _stopping.Dispose();
        ClientLog.Disconnected(_logger, Id, Server);
    }

    private void Start()
    {
        var shortest = Math.Min(
            _options.RequestTimeout == Timeout.InfiniteTimeSpan ? long.MaxValue : _options.RequestTimeout.Ticks,
            _options.ReplyTimeout == Timeout.InfiniteTimeSpan ? long.MaxValue : _options.ReplyTimeout.Ticks);
        if (shortest != long.MaxValue)
        {
            var period = TimeSpan.FromTicks(Math.Clamp(shortest / 4, TimeSpan.FromMilliseconds(10).Ticks, TimeSpan.FromSeconds(1).Ticks));
            _timeoutTimer = new Timer(static state => ((NbdConnection)state!).OnTimer(), this, period, period);
        }

        // The timer first: a connection that fails at once must find it to stop it (Fail).
        _readLoop = Task.Run(ReadLoopAsync);
        _writeLoop = Task.Run(WriteLoopAsync);
    }

    private void OnTimer()
    {
        ExpireRequests();
        DetectStall();
    }

    /// <summary>
    /// Requests in flight and not a byte from the server for <see cref="NbdClientOptions.ReplyTimeout"/>: the server
    /// or the path to it hangs. The connection is failed, so its requests go out again on a new one.
    /// </summary>
    private void DetectStall()
    {
        var timeout = _options.ReplyTimeout;
        if (timeout == Timeout.InfiniteTimeSpan)
        {
            return;
        }

        long busySince;
        int count;
        lock (_pendingLock)
        {
            if (_failure is not null || _pending.Count == 0)
            {
                return;
            }

            busySince = _busySince;
            count = _pending.Count;
        }

        var quietSince = Math.Max(busySince, _receive.LastReceive);
        if (Stopwatch.GetElapsedTime(quietSince) > timeout)
        {
            Fail(new NbdConnectionException(
                $"{Server} sent nothing for {timeout.TotalSeconds:0.###} s with {count} requests in flight, so the connection was taken for dead"));
        }
    }

    /// <summary>Removes an operation from the map when its final reply arrived (or it was never sent). False if already gone.</summary>
    private bool RemovePending(NbdOperation operation)
    {
        TaskCompletionSource? drained = null;
        lock (_pendingLock)
        {
            if (!_pending.TryGetValue(operation.Cookie, out var current) || !ReferenceEquals(current, operation))
            {
                return false;
            }

            _pending.Remove(operation.Cookie);
            _inFlight--;
            if (_pending.Count == 0 && _closing)
            {
                drained = _drained;
            }
        }

        Interlocked.Increment(ref _freeSlots);
        drained?.TrySetResult();
        SlotFreed?.Invoke(this);
        return true;
    }

    /// <summary>Completes an operation whose final reply arrived.</summary>
    private void Complete(NbdOperation operation, Exception? error)
    {
        if (error is NbdServerErrorException { Error: NbdError.Shutdown })
        {
            // Closing first, so the request handed back is not given to this connection again.
            BeginSoftDisconnect();
            if (ShutdownReply is { } resend)
            {
                if (RemovePending(operation))
                {
                    resend(this, operation);
                }

                return;
            }
        }

        if (RemovePending(operation))
        {
            operation.Finish(error);
        }
    }

    /// <summary>
    /// The server answered ESHUTDOWN: "the client MUST soft-disconnect". No new requests go out here; the ones in
    /// flight get their replies, then NBD_CMD_DISC closes the connection (off the reader, which must keep reading).
    /// </summary>
    private void BeginSoftDisconnect()
    {
        lock (_pendingLock)
        {
            if (_closing || _failure is not null)
            {
                return;
            }

            _closing = true;
            _closeReason = $"{Server} is shutting down (it answered a request with ESHUTDOWN), so the client disconnected";
        }

        _ = Task.Run(async () => await DisposeAsync().ConfigureAwait(false));
    }

    /// <summary>
    /// Marks the connection failed (once), closes the socket, and hands every unacknowledged request to the owner;
    /// without an owner they fail here.
    /// </summary>
    private void Fail(Exception reason)
    {
        List<NbdOperation> orphans;
        TaskCompletionSource? drained;
        NbdConnectionException failure;
        lock (_pendingLock)
        {
            if (_failure is not null)
            {
                return;
            }

            var count = _pending.Count;
            failure = reason switch
            {
                NbdConnectionException connection when count == 0 => connection,
                NbdProtocolException protocol => new NbdProtocolException($"{protocol.Message} ({count} requests in flight failed)", protocol),
                NbdConnectionException connection => new NbdConnectionException($"{connection.Message} ({count} requests in flight failed)", connection),
                _ => new NbdConnectionException($"connection to {Server} failed: {reason.Message}", reason),
            };
            _failure = failure;
            orphans = [.. _pending.Values];
            _pending.Clear();
            _inFlight = 0;
            drained = _drained;
        }

        if (orphans.Count > 0 || !_closing)
        {
            ClientLog.ConnectionFailed(_logger, Id, Server, orphans.Count, failure.Message);
        }

        _transport.Abort();
        _sendQueue.Writer.TryComplete();

        // The timer serves a live connection only. Its owner drops a failed connection without disposing it, and a
        // running timer would keep it (buffers, requests, the timer's own ticks) alive for good: one leak per failure.
        _timeoutTimer?.Dispose();
        drained?.TrySetResult();
        if (Failed is { } owner)
        {
            owner(this, orphans, failure);
        }
        else
        {
            FailAll(orphans, failure);
        }
    }

    /// <summary>Fails every one of <paramref name="operations"/> with <see cref="Wrap"/> of <paramref name="failure"/>.</summary>
    internal static void FailAll(IEnumerable<NbdOperation> operations, Exception failure)
    {
        foreach (var operation in operations)
        {
            operation.Finish(Wrap(operation, failure));
        }
    }

    /// <summary>The exception one request gets when its connection failed.</summary>
    internal static NbdConnectionException Wrap(NbdOperation operation, Exception failure) => failure is NbdProtocolException
        ? new NbdProtocolException($"{operation} failed: {failure.Message}", failure)
        : new NbdConnectionException($"{operation} failed: {failure.Message}", failure);

    private void ExpireRequests()
    {
        var now = Stopwatch.GetTimestamp();
        List<NbdOperation>? expired = null;
        lock (_pendingLock)
        {
            foreach (var operation in _pending.Values)
            {
                if (operation.Deadline != 0 && now > operation.Deadline && !operation.IsReleased)
                {
                    (expired ??= []).Add(operation);
                }
            }
        }

        if (expired is null)
        {
            return;
        }

        var seconds = _options.RequestTimeout.TotalSeconds;
        foreach (var operation in expired)
        {
            ClientLog.RequestTimedOut(_logger, Id, Server, seconds, operation.ToString());
            operation.Abandon(new TimeoutException($"{operation}: no reply from {Server} within {seconds:0.###} s"));
        }
    }

    private static async Task WaitQuietly(Task task, TimeSpan timeout)
    {
        try
        {
            await task.WaitAsync(timeout).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is TimeoutException or OperationCanceledException or NbdException or IOException or SocketException or ObjectDisposedException)
        {
            // Closing: the reason has been recorded (or does not matter any more).
        }
    }
}
