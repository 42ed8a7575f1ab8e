using System.Diagnostics;
using System.Runtime.CompilerServices;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Spindle.Client.Connection;
using Spindle.Client.Negotiation;
using Spindle.Protocol;
using Spindle.Wire;

namespace Spindle.Client;

/// <summary>
/// A client for one NBD export: the logical side over one connection, several when the server advertises
/// multi-conn, and several paths (server addresses serving the same export) for multipath. Every call is
/// asynchronous and may be made concurrently; requests are pipelined (many in flight per connection, replies matched
/// by cookie in any order).
/// </summary>
/// <remarks>
/// <para>Requests are checked against the export before anything is sent: range, alignment to the minimum block
/// size, the maximum payload, read-only exports, and commands or flags the server did not advertise. Those
/// mistakes throw <see cref="ArgumentException"/>s and <see cref="NotSupportedException"/>; what the server or
/// the network does wrong throws <see cref="NbdException"/>s.</para>
/// <para>The client keeps every request until the server acknowledges it. When a connection is lost its
/// unanswered requests, and new ones, wait while the client reconnects, and are sent again
/// (<see cref="NbdClientOptions.DeadConnectionTimeout"/>). A FLUSH first waits for the replies to every WRITE,
/// WRITE_ZEROES and TRIM submitted before it (with multi-conn the spec requires that; on one connection it makes
/// "flush covers what was written before" hold for writes still in flight, and across a reconnection), then goes
/// out on one connection of every live path.</para>
/// </remarks>
public sealed partial class NbdClient : IAsyncDisposable
{
    private readonly NbdPath[] _paths;
    private readonly ILogger _logger;
    private readonly Lock _trackLock = new();
    private readonly Action<NbdOperation> _untrack;
    private readonly CancellationTokenSource _closing = new();
    private readonly Timer _timer;
    private NbdOperation? _unacknowledged;
    private int _unacknowledgedCount;
    private int _disposed;

    private NbdClient(NbdPath[] paths, NbdClientOptions options, ExportInfo export, ILogger logger)
    {
        _paths = paths;
        Options = options;
        _export = export;
        _logger = logger;
        _untrack = Untrack;
        var shortest = Math.Min(
            options.RequestTimeout == Timeout.InfiniteTimeSpan ? TimeSpan.FromSeconds(4).Ticks : options.RequestTimeout.Ticks,
            options.DeadConnectionTimeout == Timeout.InfiniteTimeSpan ? TimeSpan.FromSeconds(4).Ticks : options.DeadConnectionTimeout.Ticks);
        var period = TimeSpan.FromTicks(Math.Clamp(shortest / 4, TimeSpan.FromMilliseconds(10).Ticks, TimeSpan.FromSeconds(1).Ticks));
        _timer = new Timer(static state => ((NbdClient)state!).OnTimer(), this, period, period);
    }

    /// <summary>The URI the client connected to (the first path's).</summary>
    public NbdUri Uri => _paths[0].Uri;

    /// <summary>Every path (server address) the client uses for the export, in the order given.</summary>
    public IReadOnlyList<NbdUri> Paths => [.. _paths.Select(path => path.Uri)];

    /// <summary>The options the client was made with (a copy: later changes to the caller's object do not reach it).</summary>
    public NbdClientOptions Options { get; }

    /// <summary>
    /// What negotiation said about the export (the first connection's view; every other must agree). Its size grows
    /// when the export was grown on the server and every connection has since reconnected with the larger size
    /// (<see cref="SizeChanged"/>); it never shrinks.
    /// </summary>
    public ExportInfo Export => Volatile.Read(ref _export);

    /// <summary>The export's size in bytes, as <see cref="Export"/> says.</summary>
    public long Size => Export.Size;

    /// <summary>
    /// Raised (on the thread that reconnected) when the export is larger after a reconnection: an online resize on
    /// the server. A FUSE mount or anything else that sized itself from <see cref="Size"/> can pick up the new size.
    /// </summary>
    public event EventHandler<ExportSizeChangedEventArgs>? SizeChanged;

    /// <summary>Connections working now, over every path (more than one per path only with multi-conn).</summary>
    public int ConnectionCount => _paths.Sum(path => path.Connections.Count(connection => connection is { IsAvailable: true }));

    /// <summary>Requests submitted and not yet acknowledged by the server.</summary>
    public int UnacknowledgedCount => Volatile.Read(ref _unacknowledgedCount);

    /// <summary>Connections re-established after one was lost, since the client was made.</summary>
    public long Reconnections => Interlocked.Read(ref _reconnections);

    /// <summary>Requests sent again because the connection they were on was lost before answering them.</summary>
    public long ResentRequests => Interlocked.Read(ref _resent);

    /// <summary>
    /// How long the client has had no working connection at all since it was made (requests wait meanwhile), the
    /// current outage included.
    /// </summary>
    public TimeSpan BlockedTime
    {
        get
        {
            lock (_dispatchLock)
            {
                var ticks = Interlocked.Read(ref _blockedTicks) + (_downSince == 0 ? 0 : Stopwatch.GetTimestamp() - _downSince);
                return Stopwatch.GetElapsedTime(0, ticks);
            }
        }
    }

    /// <summary>How each path is doing: its working connections and its last error.</summary>
    public IReadOnlyList<NbdPathStatus> PathStatus
    {
        get
        {
            lock (_dispatchLock)
            {
                return [.. _paths.Select(path => new NbdPathStatus(path.Uri,
                    path.Connections.Count(connection => connection is { IsAvailable: true }), path.LastFailure?.Message))];
            }
        }
    }

    /// <summary>Connects to the export an NBD URI names.</summary>
    /// <exception cref="FormatException">The URI is not a valid NBD URI.</exception>
    /// <exception cref="NbdTlsException">TLS was asked for (nbds://) and failed, or the server requires it of an nbd:// URI.</exception>
    /// <exception cref="NbdException">The connection or the negotiation failed.</exception>
    public static Task<NbdClient> ConnectAsync(string uri, NbdClientOptions? options = null, CancellationToken cancellationToken = default) =>
        ConnectAsync(NbdUri.Parse(uri), options, cancellationToken);

    /// <inheritdoc cref="ConnectAsync(string, NbdClientOptions?, CancellationToken)"/>
    public static Task<NbdClient> ConnectAsync(NbdUri uri, NbdClientOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(uri);
        return ConnectAsync([uri], options, cancellationToken);
    }

    /// <summary>
    /// Connects to one export through several paths (multipath): each URI is a server address serving the same
    /// export. Requests spread over the live paths when the export advertises multi-conn (otherwise the first live
    /// path serves and the others stand by); a path that dies hands its requests to the others and is retried in the
    /// background. Every path must describe the export alike (size, flags, block sizes, and its UUID, label and serial
    /// where the server lists them); a path that does not is refused.
    /// </summary>
    /// <remarks>Connecting succeeds when at least one path works; the others are retried in the background.</remarks>
    /// <exception cref="NbdException">No path works, or two paths describe different exports.</exception>
    public static async Task<NbdClient> ConnectAsync(IReadOnlyList<NbdUri> paths, NbdClientOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(paths);
        if (paths.Count == 0 || paths.Count > 16)
        {
            throw new ArgumentException("give between 1 and 16 paths", nameof(paths));
        }

        options = (options ?? new NbdClientOptions()).Clone();
        options.Validate();
        if (paths.Count > 1)
        {
            options.DiscoverIdentity = true;
        }

        foreach (var path in paths)
        {
            ArgumentNullException.ThrowIfNull(path);
            RefuseTlsParametersWithoutTls(path);
        }

        var logger = Logger(options);
        var attempts = paths.Select((uri, index) => NbdConnection.ConnectAsync(uri, options, index * 64, logger, cancellationToken)).ToList();
        try
        {
            await Task.WhenAll(attempts).ConfigureAwait(false);
        }
        catch (Exception) when (attempts.Any(attempt => attempt.IsCompletedSuccessfully))
        {
            // Some paths work: the others are retried in the background.
        }
        catch (Exception) when (paths.Count > 1)
        {
            throw new NbdConnectionException("no path to the export works: " +
                string.Join("; ", attempts.Select((attempt, index) => $"{paths[index].Target}: {attempt.Exception?.InnerException?.Message}")),
                attempts[0].Exception!.InnerException!);
        }

        var connected = attempts.Where(attempt => attempt.IsCompletedSuccessfully).Select(attempt => attempt.Result).ToList();
        try
        {
            var reference = connected[0];
            foreach (var other in connected.Skip(1))
            {
                if (Disagreement(reference.Export, other.Export) is { } problem)
                {
                    throw new NbdConnectionException(
                        $"{other.Server} and {reference.Server} do not serve the same export, so they cannot be paths to one disk: {problem}");
                }
            }

            var perPath = options.Connections > 1 && reference.Export.CanMultiConn ? options.Connections : 1;
            if (options.Connections > 1 && !reference.Export.CanMultiConn)
            {
                ClientLog.NoMultiConn(logger, reference.Server, options.Connections);
            }

            var nbdPaths = paths.Select((uri, index) => new NbdPath(index, uri, perPath)).ToArray();
            for (var index = 0; index < paths.Count; index++)
            {
                if (attempts[index].IsCompletedSuccessfully)
                {
                    attempts[index].Result.PathIndex = index;
                    nbdPaths[index].Connections[0] = attempts[index].Result;
                }
                else
                {
                    nbdPaths[index].LastFailure = attempts[index].Exception?.InnerException;
                }
            }

            // More connections per path for multi-conn, all at once; they must describe the export alike.
            var more = new List<(NbdPath Path, int Slot, Task<NbdConnection> Attempt)>();
            foreach (var path in nbdPaths.Where(path => path.Connections[0] is not null))
            {
                for (var slot = 1; slot < perPath; slot++)
                {
                    more.Add((path, slot, NbdConnection.ConnectAsync(path.Uri, options, (path.Index * 64) + slot, logger, cancellationToken)));
                }
            }

            try
            {
                await Task.WhenAll(more.Select(m => m.Attempt)).ConfigureAwait(false);
            }
            finally
            {
                foreach (var (path, slot, attempt) in more.Where(m => m.Attempt.IsCompletedSuccessfully))
                {
                    attempt.Result.PathIndex = path.Index;
                    path.Connections[slot] = attempt.Result;
                    connected.Add(attempt.Result);
                }
            }

            foreach (var (path, _, attempt) in more)
            {
                if (Disagreement(reference.Export, attempt.Result.Export) is { } problem)
                {
                    throw new NbdProtocolException(
                        $"{reference.Server} described export '{path.Uri.ExportName}' differently on connection {attempt.Result.Id} than on the first: {problem}");
                }
            }

            var client = new NbdClient(nbdPaths, options, reference.Export, logger);
            client.Start();
            ClientMetrics.Register(client);
            return client;
        }
        catch
        {
            foreach (var connection in connected)
            {
                await connection.DisposeAsync().ConfigureAwait(false);
            }

            throw;
        }
    }

    /// <summary>
    /// Lists the server's exports (NBD_OPT_LIST) with what NBD_OPT_INFO says about each, then leaves with
    /// NBD_OPT_ABORT. <paramref name="uri"/>'s export name is not used.
    /// </summary>
    /// <remarks>
    /// nbd-server 3.24 answers NBD_OPT_INFO with size 0 until an export is opened; an export reported with size 0 is
    /// therefore checked again with NBD_OPT_GO on a connection of its own.
    /// </remarks>
    public static async Task<IReadOnlyList<ExportListing>> ListExportsAsync(NbdUri uri, NbdClientOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(uri);
        options ??= new NbdClientOptions();
        options.Validate();
        RefuseTlsParametersWithoutTls(uri);
        var tls = uri.RequiresTls ? ClientTls.Resolve(uri, options.Tls) : null;
        var logger = Logger(options);
        var transport = await TransportConnector.ConnectAsync(uri, options.ConnectTimeout, cancellationToken).ConfigureAwait(false);
        List<ExportListing> listings;
        using (var receive = new ReceiveBuffer(transport, ReceiveBufferOptions.Client))
        {
            var negotiator = new ClientNegotiator(transport, receive, logger);
            try
            {
                listings = await NbdConnection.HandshakeAsync(negotiator, options.HandshakeTimeout, async (negotiator, token) =>
                {
                    await negotiator.StartAsync(token).ConfigureAwait(false);
                    if (tls is not null)
                    {
                        await negotiator.StartTlsAsync(tls, token).ConfigureAwait(false);
                    }

                    if (!negotiator.FixedNewstyle)
                    {
                        throw new NbdOptionException(NbdOption.List, OptionReplyType.ErrorUnsupported,
                            $"{transport.RemoteDescription} does not speak fixed newstyle, so it cannot list its exports");
                    }

                    var structured = options.StructuredReplies && await negotiator.RequestStructuredRepliesAsync(token).ConfigureAwait(false);
                    var names = await negotiator.ListAsync(token).ConfigureAwait(false);
                    var result = new List<ExportListing>(names.Count);
                    foreach (var (name, description) in names)
                    {
                        try
                        {
                            var info = await negotiator.InfoOrGoAsync(NbdOption.Info, name, token).ConfigureAwait(false);
                            // NBD_OPT_LIST_META_CONTEXT with no queries: every context the export offers (nbdinfo --list
                            // shows them too). Only meaningful once structured replies are on (proto.md, "Metadata querying").
                            IReadOnlyList<string>? available = null;
                            if (info is not null && structured && options.ListMetaContexts)
                            {
                                try
                                {
                                    var offered = await negotiator.MetaContextAsync(NbdOption.ListMetaContext, name, [], token).ConfigureAwait(false);
                                    available = [.. offered.Keys.Order(StringComparer.Ordinal)];
                                }
                                catch (NbdOptionException exception) when (exception.Reply is not OptionReplyType.ErrorShutdown)
                                {
                                    // A server that will not list contexts still describes the export: shown without them.
                                }
                            }

                            var export = info is null
                                ? null
                                : NbdConnection.BuildExportInfo(name, info, negotiator, structured, new Dictionary<string, uint>(), available, NegotiationMethod.Go, options.MaxPayload);
                            result.Add(new ExportListing(name, string.IsNullOrEmpty(description) ? export?.Description : description, export,
                                info is null ? "the server does not support NBD_OPT_INFO" : null));
                        }
                        catch (Exception exception) when (exception is NbdOptionException { Reply: not OptionReplyType.ErrorShutdown } or NbdTlsException)
                        {
                            // One export the server will not describe (unknown now, TLS-only...) does not spoil the list.
                            result.Add(new ExportListing(name, string.IsNullOrEmpty(description) ? null : description, null, exception.Message));
                        }
                    }

                    await negotiator.AbortAsync(token).ConfigureAwait(false);
                    return result;
                }, cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                await negotiator.Transport.DisposeAsync().ConfigureAwait(false);
            }
        }

        for (var i = 0; i < listings.Count; i++)
        {
            if (listings[i].Info is { Size: 0 } zero)
            {
                ClientLog.ConfirmingZeroSize(logger, uri.Target, listings[i].Name);
                var confirmOptions = new NbdClientOptions
                {
                    StructuredReplies = options.StructuredReplies,
                    ConnectTimeout = options.ConnectTimeout,
                    HandshakeTimeout = options.HandshakeTimeout,
                    MaxPayload = options.MaxPayload,
                    LoggerFactory = options.LoggerFactory,
                    Tls = options.Tls,
                    DeadConnectionTimeout = TimeSpan.Zero,
                };
                confirmOptions.MetaContexts.Clear();
                try
                {
                    var client = await ConnectAsync(uri.WithExportName(listings[i].Name), confirmOptions, cancellationToken).ConfigureAwait(false);
                    await using (client.ConfigureAwait(false))
                    {
                        listings[i] = listings[i] with { Info = client.Export with { Description = zero.Description ?? client.Export.Description } };
                    }
                }
                catch (NbdException)
                {
                    // Keep what INFO said: the export may really be empty, or GO refused while INFO did not.
                }
            }
        }

        return listings;
    }

    /// <summary>Reads <paramref name="buffer"/>.Length bytes at <paramref name="offset"/>.</summary>
    public ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken = default) =>
        ReadAsync(offset, buffer, CommandFlags.None, cancellationToken);

    /// <summary>Reads with flags (<see cref="CommandFlags.DontFragment"/> is the only one a READ takes).</summary>
    public ValueTask ReadAsync(long offset, Memory<byte> buffer, CommandFlags flags, CancellationToken cancellationToken = default)
    {
        if (!TryValidate(NbdCommand.Read, offset, buffer.Length, flags, out var invalid))
        {
            return ValueTask.FromException(invalid);
        }

        return buffer.IsEmpty ? ValueTask.CompletedTask : SubmitAsync(NbdOperation.Read(offset, buffer, flags), cancellationToken);
    }

    /// <summary>Writes <paramref name="data"/> at <paramref name="offset"/>. The memory must not change until the task completes.</summary>
    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default) =>
        WriteAsync(offset, data, CommandFlags.None, cancellationToken);

    /// <summary>Writes with flags (<see cref="CommandFlags.Fua"/>: durable before the reply).</summary>
    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CommandFlags flags, CancellationToken cancellationToken = default)
    {
        if (!TryValidate(NbdCommand.Write, offset, data.Length, flags, out var invalid))
        {
            return ValueTask.FromException(invalid);
        }

        return data.IsEmpty ? ValueTask.CompletedTask : SubmitAsync(NbdOperation.Write(offset, data, flags), cancellationToken);
    }

    /// <summary>
    /// Makes every write acknowledged so far durable: first waits for the replies to all writes, zeroes and trims
    /// submitted before this call, then sends NBD_CMD_FLUSH.
    /// </summary>
    public ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        if (!TryValidate(NbdCommand.Flush, 0, 0, CommandFlags.None, out var invalid))
        {
            return ValueTask.FromException(invalid);
        }

        return FlushCoreAsync(cancellationToken);
    }

    /// <summary>Discards a range (a hint; contents are undefined afterwards). Lengths beyond 4 GiB are split.</summary>
    public ValueTask TrimAsync(long offset, long length, CommandFlags flags = CommandFlags.None, CancellationToken cancellationToken = default) =>
        EffectAsync(NbdCommand.Trim, offset, length, flags, cancellationToken);

    /// <summary>
    /// Makes a range read as zeroes. Flags: <see cref="CommandFlags.NoHole"/> (keep it allocated),
    /// <see cref="CommandFlags.FastZero"/> (fail with ENOTSUP unless it is fast), <see cref="CommandFlags.Fua"/>.
    /// </summary>
    public ValueTask WriteZeroesAsync(long offset, long length, CommandFlags flags = CommandFlags.None, CancellationToken cancellationToken = default) =>
        EffectAsync(NbdCommand.WriteZeroes, offset, length, flags, cancellationToken);

    /// <summary>Asks the server to prefetch a range (NBD_CMD_CACHE).</summary>
    public ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken = default) =>
        EffectAsync(NbdCommand.Cache, offset, length, CommandFlags.None, cancellationToken);

    /// <summary>
    /// One BLOCK_STATUS request for <paramref name="context"/> (which must have been negotiated). The server may
    /// answer for less than was asked; <see cref="GetExtentsAsync"/> asks until the range is covered.
    /// </summary>
    public async Task<BlockStatusResult> GetBlockStatusAsync(long offset, long length, string context = MetaContexts.BaseAllocation,
        CommandFlags flags = CommandFlags.None, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(context);
        if (!Export.MetaContexts.ContainsKey(context))
        {
            throw new NotSupportedException(Export.MetaContexts.Count == 0
                ? $"block status is not available on this export: the server did not agree to meta context '{context}' (structured replies {(Export.StructuredReplies ? "on" : "off")})"
                : $"the server did not agree to meta context '{context}' (negotiated: {string.Join(", ", Export.MetaContexts.Keys)})");
        }

        var clamped = Math.Min(length, MaxEffectLength);
        if (!TryValidate(NbdCommand.BlockStatus, offset, clamped, flags, out var invalid))
        {
            throw invalid;
        }

        var operation = NbdOperation.BlockStatus(offset, clamped, context, flags);
        await SubmitAsync(operation, cancellationToken).ConfigureAwait(false);
        var extents = operation.Extents!;
        var requestOne = (flags & CommandFlags.RequestOne) != 0;
        long described = 0;
        for (var i = 0; i < extents.Count - 1; i++)
        {
            described += extents[i].Length;
        }

        // proto.md: with REQ_ONE exactly one extent no longer than asked; without it, every extent but the last lies
        // inside the request.
        if ((requestOne && (extents.Count != 1 || extents[0].Length > clamped)) || (!requestOne && described >= clamped))
        {
            throw new NbdProtocolException($"{Uri.Target} answered BLOCK_STATUS offset {offset} length {clamped} with {extents.Count} extents that break the spec's rules");
        }

        var result = new NbdExtent[extents.Count];
        var position = offset;
        for (var i = 0; i < extents.Count; i++)
        {
            result[i] = new NbdExtent(position, extents[i].Length, extents[i].Flags);
            position += extents[i].Length;
        }

        return new BlockStatusResult(context, offset, result);
    }

    /// <summary>
    /// The extents of [<paramref name="offset"/>, +<paramref name="length"/>) in <paramref name="context"/>, asking
    /// the server as many times as it takes and clipping the last extent to the range.
    /// </summary>
    public async IAsyncEnumerable<NbdExtent> GetExtentsAsync(long offset, long length, string context = MetaContexts.BaseAllocation,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var end = offset + length;
        var position = offset;
        while (position < end)
        {
            var answer = await GetBlockStatusAsync(position, end - position, context, CommandFlags.None, cancellationToken).ConfigureAwait(false);
            foreach (var extent in answer.Extents)
            {
                var clipped = Math.Min(extent.End, end) - extent.Offset;
                if (clipped <= 0)
                {
                    break;
                }

                yield return extent with { Length = clipped };
            }

            position = Math.Min(answer.End, end);
        }
    }

    /// <summary>
    /// Closes gracefully: requests still waiting for a connection fail; those in flight get (up to
    /// <see cref="NbdClientOptions.DisconnectTimeout"/>) to be answered; then NBD_CMD_DISC goes out on every connection.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        await _closing.CancelAsync().ConfigureAwait(false);
        ClientMetrics.Unregister(this);
        List<NbdOperation> waiting;
        NbdConnection[] connections;
        lock (_dispatchLock)
        {
            waiting = TakeAllWaitingLocked();
            _eligible = [];
            connections = [.. _paths.SelectMany(path => path.Connections).OfType<NbdConnection>()];
        }

        var closed = new NbdConnectionException($"the client for {Uri} has been closed");
        NbdConnection.FailAll(waiting, closed);

        await Task.WhenAll(connections.Select(connection => connection.DisposeAsync().AsTask())).ConfigureAwait(false);
        await _timer.DisposeAsync().ConfigureAwait(false);
        _closing.Dispose();
    }

    /// <summary>
    /// tls-* parameters on a plain nbd:// URI would suggest TLS where there is none: nbd:// never uses TLS here, so
    /// such a URI is refused rather than silently sent in plain text.
    /// </summary>
    private static void RefuseTlsParametersWithoutTls(NbdUri uri)
    {
        if (!uri.RequiresTls && (uri.TlsCertificates is not null || uri.TlsHostname is not null || uri.TlsVerifyPeer is not null || uri.TlsType is not null))
        {
            throw new NbdTlsException(
                $"'{uri}' has TLS parameters, but {uri.Scheme}:// never uses TLS: write {(uri.Transport == NbdTransportKind.Unix ? "nbds+unix" : "nbds")}:// for TLS");
        }
    }

    private static ILogger Logger(NbdClientOptions options) =>
        options.LoggerFactory?.CreateLogger("Spindle.Client") ?? NullLogger.Instance;
}

/// <summary>How one path of a client is doing.</summary>
/// <param name="Uri">The path's server address and export.</param>
/// <param name="Connections">Working connections (0 while it is down and being retried).</param>
/// <param name="LastError">Why it last failed, if it ever did.</param>
public sealed record NbdPathStatus(NbdUri Uri, int Connections, string? LastError);
