using System.Runtime.CompilerServices;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Spindle.Client.Connection;
using Spindle.Client.Transport;
using Spindle.Protocol;

namespace Spindle.Client;

/// <summary>
/// A client for one NBD export: the logical side over one connection, or several when the server advertises
/// multi-conn. Every call is asynchronous and may be made concurrently; requests are pipelined (many in flight per
/// connection, replies matched by cookie in any order).
/// </summary>
/// <remarks>
/// <para>Requests are checked against the export before anything is sent: range, alignment to the minimum block
/// size, the maximum payload, read-only exports, and commands or flags the server did not advertise. Those
/// mistakes throw <see cref="ArgumentException"/>s and <see cref="NotSupportedException"/>; what the server or
/// the network does wrong throws <see cref="NbdException"/>s.</para>
/// <para>The client keeps every request until the server acknowledges it. A FLUSH first waits for the replies to
/// every WRITE, WRITE_ZEROES and TRIM submitted before it (with multi-conn the spec requires that; on one
/// connection it makes "flush covers what was written before" hold for writes still in flight), then goes out on
/// one connection.</para>
/// </remarks>
public sealed partial class NbdClient : IAsyncDisposable
{
    private readonly NbdConnection[] _connections;
    private readonly Lock _trackLock = new();
    private readonly Action<NbdOperation> _untrack;
    private NbdOperation? _unacknowledged;
    private int _unacknowledgedCount;
    private int _disposed;

    private NbdClient(NbdUri uri, NbdClientOptions options, NbdConnection[] connections)
    {
        Uri = uri;
        Options = options;
        _connections = connections;
        _untrack = Untrack;
        foreach (var connection in connections)
        {
            connection.Failed = OnConnectionFailed;
        }
    }

    /// <summary>The URI the client connected to.</summary>
    public NbdUri Uri { get; }

    /// <summary>The options the client was made with (what opening another connection to the export would need).</summary>
    public NbdClientOptions Options { get; }

    /// <summary>What negotiation said about the export (the first connection's view; the others must agree).</summary>
    public ExportInfo Export => _connections[0].Export;

    public long Size => Export.Size;

    /// <summary>Connections in use: more than one only with multi-conn.</summary>
    public int ConnectionCount => _connections.Length;

    /// <summary>Requests submitted and not yet acknowledged by the server.</summary>
    public int UnacknowledgedCount => Volatile.Read(ref _unacknowledgedCount);

    /// <summary>Connects to the export an NBD URI names.</summary>
    /// <exception cref="FormatException">The URI is not a valid NBD URI.</exception>
    /// <exception cref="NbdTlsNotSupportedException">The URI requires TLS (nbds://), which this client does not have yet.</exception>
    /// <exception cref="NbdException">The connection or the negotiation failed.</exception>
    public static Task<NbdClient> ConnectAsync(string uri, NbdClientOptions? options = null, CancellationToken cancellationToken = default) =>
        ConnectAsync(NbdUri.Parse(uri), options, cancellationToken);

    /// <inheritdoc cref="ConnectAsync(string, NbdClientOptions?, CancellationToken)"/>
    public static async Task<NbdClient> ConnectAsync(NbdUri uri, NbdClientOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(uri);
        options ??= new NbdClientOptions();
        options.Validate();
        RefuseTls(uri);
        var logger = Logger(options);
        var first = await NbdConnection.ConnectAsync(uri, options, 0, logger, cancellationToken).ConfigureAwait(false);
        var connections = new List<NbdConnection> { first };
        try
        {
            if (options.Connections > 1)
            {
                if (first.Export.CanMultiConn)
                {
                    var more = Enumerable.Range(1, options.Connections - 1)
                        .Select(id => NbdConnection.ConnectAsync(uri, options, id, logger, cancellationToken))
                        .ToList();
                    try
                    {
                        await Task.WhenAll(more).ConfigureAwait(false);
                    }
                    finally
                    {
                        connections.AddRange(more.Where(task => task.IsCompletedSuccessfully).Select(task => task.Result));
                    }

                    foreach (var connection in connections.Skip(1))
                    {
                        if (connection.Export.Size != first.Export.Size || connection.Export.Flags != first.Export.Flags)
                        {
                            throw new NbdProtocolException(
                                $"{first.Server} described export '{uri.ExportName}' differently on connection {connection.Id} (size {connection.Export.Size}, flags {connection.Export.Flags}) than on the first (size {first.Export.Size}, flags {first.Export.Flags})");
                        }
                    }
                }
                else
                {
                    ClientLog.NoMultiConn(logger, first.Server, options.Connections);
                }
            }
        }
        catch
        {
            foreach (var connection in connections)
            {
                await connection.DisposeAsync().ConfigureAwait(false);
            }

            throw;
        }

        return new NbdClient(uri, options, [.. connections]);
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
        RefuseTls(uri);
        var logger = Logger(options);
        var transport = await TransportConnector.ConnectAsync(uri, options.ConnectTimeout, cancellationToken).ConfigureAwait(false);
        List<ExportListing> listings;
        using (var receive = new ReceiveBuffer(transport))
        {
            await using (transport.ConfigureAwait(false))
            {
                listings = await NbdConnection.HandshakeAsync(transport, receive, options.HandshakeTimeout, logger, async (negotiator, token) =>
                {
                    await negotiator.StartAsync(token).ConfigureAwait(false);
                    if (!negotiator.FixedNewstyle)
                    {
                        throw new NbdOptionException(NbdOption.List, OptionReplyType.ErrorUnsupported,
                            $"{transport.Description} does not speak fixed newstyle, so it cannot list its exports");
                    }

                    var structured = options.StructuredReplies && await negotiator.RequestStructuredRepliesAsync(token).ConfigureAwait(false);
                    var names = await negotiator.ListAsync(token).ConfigureAwait(false);
                    var result = new List<ExportListing>(names.Count);
                    foreach (var (name, description) in names)
                    {
                        try
                        {
                            var info = await negotiator.InfoOrGoAsync(NbdOption.Info, name, token).ConfigureAwait(false);
                            var export = info is null
                                ? null
                                : NbdConnection.BuildExportInfo(name, info, negotiator, structured, new Dictionary<string, uint>(), null, NegotiationMethod.Go, options.MaxPayload);
                            result.Add(new ExportListing(name, string.IsNullOrEmpty(description) ? export?.Description : description, export,
                                info is null ? "the server does not support NBD_OPT_INFO" : null));
                        }
                        catch (Exception exception) when (exception is NbdOptionException { Reply: not OptionReplyType.ErrorShutdown } or NbdTlsNotSupportedException)
                        {
                            // One export the server will not describe (unknown now, TLS-only...) does not spoil the list.
                            result.Add(new ExportListing(name, string.IsNullOrEmpty(description) ? null : description, null, exception.Message));
                        }
                    }

                    await negotiator.AbortAsync(token).ConfigureAwait(false);
                    return result;
                }, cancellationToken).ConfigureAwait(false);
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
    /// Closes gracefully: waits (up to <see cref="NbdClientOptions.DisconnectTimeout"/>) for requests in flight, then
    /// sends NBD_CMD_DISC on every connection.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        await Task.WhenAll(_connections.Select(connection => connection.DisposeAsync().AsTask())).ConfigureAwait(false);
    }

    private static void RefuseTls(NbdUri uri)
    {
        if (uri.RequiresTls)
        {
            throw new NbdTlsNotSupportedException(
                $"'{uri}' requires TLS ({uri.Scheme}://), and TLS not supported yet; refusing to connect without it (use {(uri.Transport == NbdTransportKind.Unix ? "nbd+unix" : "nbd")}:// if the server accepts plain text)");
        }
    }

    private static ILogger Logger(NbdClientOptions options) =>
        options.LoggerFactory?.CreateLogger("Spindle.Client") ?? NullLogger.Instance;
}
