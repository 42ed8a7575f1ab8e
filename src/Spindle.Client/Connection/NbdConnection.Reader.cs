using System.Buffers.Binary;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using Spindle.Protocol;

namespace Spindle.Client.Connection;

internal sealed partial class NbdConnection
{
    /// <summary>The most extents a BLOCK_STATUS chunk may carry here: twice the 2^20 the spec says a server should stay under.</summary>
    private const ulong MaxBlockStatusExtents = 1ul << 21;

    /// <summary>An ERROR_OFFSET chunk with the longest message the protocol allows.</summary>
    private const int MaxErrorPayload = 6 + NbdLimits.MaxStringLength + 8;

    /// <summary>
    /// The reader loop: one reply header (simple, 16 bytes), chunk header (structured, 20 bytes) or, with extended
    /// headers, extended chunk header (32 bytes) at a time, the request found by cookie, data received straight into
    /// the request's buffer. Any inconsistency is a protocol violation and ends the connection ("the client MUST
    /// hard-disconnect"); an end of stream fails every request still waiting.
    /// </summary>
    private async Task ReadLoopAsync()
    {
        var token = _stopping.Token;
        var extended = Export.ExtendedHeaders;
        try
        {
            while (true)
            {
                await _receive.EnsureAsync(4, "a reply", token).ConfigureAwait(false);
                var magic = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span);
                if (extended && magic != NbdMagic.ExtendedReplyMagic)
                {
                    // The extension: with extended headers every reply is an extended chunk; simple replies are forbidden.
                    throw new NbdProtocolException(
                        $"{Server} sent a reply with magic 0x{magic:x8} although extended headers were negotiated (every reply must be an extended chunk, 0x6e8a278c)");
                }

                if (magic == NbdMagic.SimpleReplyMagic)
                {
                    await ReadSimpleReplyAsync(token).ConfigureAwait(false);
                }
                else if (magic == NbdMagic.StructuredReplyMagic || magic == NbdMagic.ExtendedReplyMagic)
                {
                    await ReadChunkAsync(magic == NbdMagic.ExtendedReplyMagic, token).ConfigureAwait(false);
                }
                else
                {
                    throw new NbdProtocolException(
                        $"{Server} sent a reply with magic 0x{magic:x8}, neither a simple reply (0x67446698) nor a structured one (0x668e33ef)");
                }
            }
        }
        catch (OperationCanceledException) when (token.IsCancellationRequested)
        {
        }
        catch (EndOfStreamException exception)
        {
            bool quiet;
            lock (_pendingLock)
            {
                quiet = _closing && _pending.Count == 0;
            }

            if (!quiet)
            {
                Fail(new NbdConnectionException($"connection to {Server} lost: {exception.Message}", exception));
            }
        }
        catch (NbdProtocolException exception)
        {
            Fail(exception);
        }
        catch (Exception exception) when (exception is SocketException or IOException or ObjectDisposedException)
        {
            Fail(new NbdConnectionException($"connection to {Server} lost: {exception.Message}", exception));
        }
        catch (Exception exception)
        {
            // A bug, not the network: still fail every request rather than leave callers waiting.
            Fail(exception);
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReadSimpleReplyAsync(CancellationToken token)
    {
        await _receive.EnsureAsync(SimpleReply.Length, "a reply", token).ConfigureAwait(false);
        SimpleReply.TryRead(_receive.Span, out var reply);
        _receive.Consume(SimpleReply.Length);
        var operation = Lookup(reply.Cookie, null);
        if (reply.Error != NbdError.None)
        {
            Complete(operation, ServerError(operation, reply.Error, null, null));
            return;
        }

        if (operation.Command == NbdCommand.Read)
        {
            // With structured replies a READ "MUST" be answered with chunks; a server that still sends a simple reply
            // sends the data after it, and its length is known, so the stream stays in step: accept it.
            await ReceiveDataAsync(operation, 0, (int)operation.Length, token).ConfigureAwait(false);
            operation.AddChunk(0, operation.Length);
        }

        FinishReply(operation);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReadChunkAsync(bool extended, CancellationToken token)
    {
        if (!extended && !Export.StructuredReplies)
        {
            throw new NbdProtocolException($"{Server} sent a structured reply chunk although structured replies were not negotiated");
        }

        if (extended && !Export.ExtendedHeaders)
        {
            throw new NbdProtocolException($"{Server} sent an extended reply chunk although extended headers were not negotiated");
        }

        ReplyType type;
        ulong cookie;
        ulong length;
        bool done;
        if (extended)
        {
            await _receive.EnsureAsync(ExtendedReplyHeader.Length, "a reply", token).ConfigureAwait(false);
            ExtendedReplyHeader.TryRead(_receive.Span, out var header);
            _receive.Consume(ExtendedReplyHeader.Length);
            (type, cookie, length, done) = (header.Type, header.Cookie, header.PayloadLength, header.IsDone);
        }
        else
        {
            await _receive.EnsureAsync(StructuredReplyHeader.Length, "a reply", token).ConfigureAwait(false);
            StructuredReplyHeader.TryRead(_receive.Span, out var header);
            _receive.Consume(StructuredReplyHeader.Length);
            (type, cookie, length, done) = (header.Type, header.Cookie, header.PayloadLength, header.IsDone);
        }

        var operation = Lookup(cookie, type);
        try
        {
            switch (type)
            {
                case ReplyType.None:
                    if (length != 0 || !done)
                    {
                        throw Violation(operation, length != 0 ? $"a NONE chunk with {length} payload bytes" : "a NONE chunk without the DONE flag");
                    }

                    break;

                case ReplyType.OffsetData:
                    {
                        if (operation.Command != NbdCommand.Read)
                        {
                            throw Violation(operation, "an OFFSET_DATA chunk for a request that is not a READ");
                        }

                        if (length < 9 || length - 8 > (ulong)operation.Length)
                        {
                            throw Violation(operation, $"an OFFSET_DATA chunk of {length} bytes");
                        }

                        await _receive.EnsureAsync(8, "a reply", token).ConfigureAwait(false);
                        var offset = BinaryPrimitives.ReadUInt64BigEndian(_receive.Span);
                        _receive.Consume(8);
                        var count = (int)(length - 8);
                        var relative = CheckRange(operation, offset, count, "OFFSET_DATA");
                        await ReceiveDataAsync(operation, relative, count, token).ConfigureAwait(false);
                        operation.AddChunk(relative, count);
                        break;
                    }

                case ReplyType.OffsetHole:
                    {
                        if (operation.Command != NbdCommand.Read)
                        {
                            throw Violation(operation, "an OFFSET_HOLE chunk for a request that is not a READ");
                        }

                        if (length != 12)
                        {
                            throw Violation(operation, $"an OFFSET_HOLE chunk of {length} bytes (it must be 12)");
                        }

                        await _receive.EnsureAsync(12, "a reply", token).ConfigureAwait(false);
                        var offset = BinaryPrimitives.ReadUInt64BigEndian(_receive.Span);
                        var size = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span[8..]);
                        _receive.Consume(12);
                        if (size == 0)
                        {
                            throw Violation(operation, "an OFFSET_HOLE chunk of size 0");
                        }

                        var relative = CheckRange(operation, offset, size, "OFFSET_HOLE");
                        if (operation.TryBeginReceive())
                        {
                            operation.Buffer.Span.Slice((int)relative, (int)size).Clear();
                            operation.EndReceive();
                        }

                        operation.AddChunk(relative, size);
                        break;
                    }

                case ReplyType.BlockStatus when extended:
                    throw Violation(operation, "a BLOCK_STATUS chunk although extended headers were negotiated (BLOCK_STATUS_EXT is the only form then)");

                case ReplyType.BlockStatus:
                    await ReadBlockStatusAsync(operation, length, wide: false, token).ConfigureAwait(false);
                    break;

                case ReplyType.BlockStatusExtended when !extended:
                    throw Violation(operation, "a BLOCK_STATUS_EXT chunk although extended headers were not negotiated");

                case ReplyType.BlockStatusExtended:
                    await ReadBlockStatusAsync(operation, length, wide: true, token).ConfigureAwait(false);
                    break;

                case ReplyType.Error:
                case ReplyType.ErrorOffset:
                    {
                        if (length < 6 || length > MaxErrorPayload)
                        {
                            throw Violation(operation, $"an error chunk of {length} bytes");
                        }

                        await _receive.EnsureAsync((int)length, "a reply", token).ConfigureAwait(false);
                        if (!StructuredReplyChunks.TryReadError(_receive.Span[..(int)length], type, out var error, out var message, out var errorOffset))
                        {
                            throw Violation(operation, $"a malformed {ChunkName(type)} chunk (its message length overruns it)");
                        }

                        _receive.Consume((int)length);

                        // "error MUST be nonzero"; a zero is still a failure, and EINVAL is the catch-all.
                        operation.ReplyError ??= ServerError(operation, error == NbdError.None ? NbdError.InvalidArgument : error, message, errorOffset);
                        break;
                    }

                default:
                    if (((ushort)type & 0x8000) == 0)
                    {
                        throw Violation(operation, $"a chunk of unknown type {(ushort)type}");
                    }

                    // An unknown error type: the request failed; skip the payload and carry on (proto.md).
                    if (length > MaxErrorPayload)
                    {
                        throw Violation(operation, $"an error chunk of unknown type {(ushort)type} and {length} bytes");
                    }

                    await _receive.EnsureAsync((int)length, "a reply", token).ConfigureAwait(false);
                    var unknownMessage = StructuredReplyChunks.TryReadError(_receive.Span[..(int)length], ReplyType.Error, out _, out var text, out _) ? text : null;
                    _receive.Consume((int)length);
                    operation.ReplyError ??= ServerError(operation, NbdError.InvalidArgument,
                        $"unknown error chunk type 0x{(ushort)type:x4}" + (string.IsNullOrEmpty(unknownMessage) ? string.Empty : ": " + unknownMessage), null);
                    break;
            }
        }
        catch (EndOfStreamException exception)
        {
            throw new EndOfStreamException($"{exception.Message} (in the reply to {operation})", exception);
        }

        if (done)
        {
            FinishReply(operation);
        }
    }

    /// <summary>
    /// A BLOCK_STATUS chunk (u32 context id, n x (u32 length, u32 status)) or, with extended headers, a
    /// BLOCK_STATUS_EXT chunk (u32 context id, u32 count, n x (u64 length, u64 status)). Only the context the request
    /// asked for is kept; chunks for other selected contexts are read and dropped.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReadBlockStatusAsync(NbdOperation operation, ulong length, bool wide, CancellationToken token)
    {
        if (operation.Command != NbdCommand.BlockStatus)
        {
            throw Violation(operation, $"a {(wide ? "BLOCK_STATUS_EXT" : "BLOCK_STATUS")} chunk for a request that is not BLOCK_STATUS");
        }

        var prefix = wide ? 8 : 4;
        var descriptor = wide ? 16 : 8;
        if (length < (ulong)(prefix + descriptor) || (length - (ulong)prefix) % (ulong)descriptor != 0 || length > (ulong)prefix + ((ulong)descriptor * MaxBlockStatusExtents))
        {
            throw Violation(operation, wide
                ? $"a BLOCK_STATUS_EXT chunk of {length} bytes (it must be 8 + 16 n, n >= 1)"
                : $"a BLOCK_STATUS chunk of {length} bytes (it must be 4 + 8 n, n >= 1)");
        }

        var count = (length - (ulong)prefix) / (ulong)descriptor;
        await _receive.EnsureAsync(prefix, "a reply", token).ConfigureAwait(false);
        var contextId = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span);
        if (wide)
        {
            // The count must match the length (a zero count is not allowed either: n >= 1 descriptors were sent).
            var stated = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span[4..]);
            if (stated != count)
            {
                throw Violation(operation, $"a BLOCK_STATUS_EXT chunk that says {stated} descriptors in {count}");
            }
        }

        _receive.Consume(prefix);
        if (!_contextNames.TryGetValue(contextId, out var name))
        {
            throw Violation(operation, $"a BLOCK_STATUS chunk for context id {contextId}, which was never selected");
        }

        var wanted = name == operation.Context;
        if (wanted && operation.SawContext)
        {
            throw Violation(operation, $"two BLOCK_STATUS chunks for context '{name}'");
        }

        var extents = operation.Extents!;
        for (var i = 0ul; i < count; i++)
        {
            await _receive.EnsureAsync(descriptor, "a reply", token).ConfigureAwait(false);
            var extentLength = wide ? BinaryPrimitives.ReadUInt64BigEndian(_receive.Span) : BinaryPrimitives.ReadUInt32BigEndian(_receive.Span);
            var status = wide ? BinaryPrimitives.ReadUInt64BigEndian(_receive.Span[8..]) : BinaryPrimitives.ReadUInt32BigEndian(_receive.Span[4..]);
            _receive.Consume(descriptor);
            if (extentLength == 0 || extentLength > long.MaxValue)
            {
                throw Violation(operation, $"a BLOCK_STATUS extent of length {extentLength} for context '{name}'");
            }

            if (status > uint.MaxValue)
            {
                // Every context this client knows has 32-bit statuses; "the top 32 bits are zero" for them.
                throw Violation(operation, $"a BLOCK_STATUS status 0x{status:x} wider than 32 bits for context '{name}'");
            }

            if (wanted)
            {
                extents.Add(new StatusExtent((long)extentLength, (uint)status));
            }
        }

        if (wanted)
        {
            operation.SawContext = true;
        }
    }

    /// <summary>Checks the request-specific promises of a complete reply, then completes the request.</summary>
    private void FinishReply(NbdOperation operation)
    {
        var error = operation.ReplyError;
        if (error is null && operation.Command == NbdCommand.Read && !operation.IsFullyCovered(out var problem))
        {
            throw Violation(operation, $"a READ reply that does not cover the request exactly once: {problem}");
        }

        if (error is null && operation.Command == NbdCommand.BlockStatus && !operation.SawContext)
        {
            // The stream is still in step, so only this request fails.
            error = new NbdProtocolException($"{Server} answered {operation} without a BLOCK_STATUS chunk for context '{operation.Context}'");
        }

        Complete(operation, error);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReceiveDataAsync(NbdOperation operation, long relative, int count, CancellationToken token)
    {
        if (count == 0)
        {
            return;
        }

        if (operation.TryBeginReceive())
        {
            try
            {
                await _receive.ReadExactlyAsync(operation.Buffer.Slice((int)relative, count), "the read data", token).ConfigureAwait(false);
            }
            finally
            {
                operation.EndReceive();
            }
        }
        else
        {
            // The caller left (cancelled, timed out): the data still has to be read to stay in step.
            await _receive.DiscardAsync(count, "the read data", token).ConfigureAwait(false);
        }
    }

    private NbdOperation Lookup(ulong cookie, ReplyType? chunk)
    {
        lock (_pendingLock)
        {
            if (_pending.TryGetValue(cookie, out var operation) && operation.IsOnWire)
            {
                return operation;
            }
        }

        var what = chunk is { } type ? $"a {ChunkName(type)} chunk" : "a simple reply";
        throw new NbdProtocolException($"{Server} sent {what} with cookie 0x{cookie:x}, which matches no request in flight");
    }

    private long CheckRange(NbdOperation operation, ulong offset, long count, string chunk)
    {
        var start = (ulong)operation.Offset;
        if (offset < start || offset - start > (ulong)operation.Length || (ulong)count > (ulong)operation.Length - (offset - start))
        {
            throw Violation(operation, $"an {chunk} chunk for offset {offset} length {count}, outside the request");
        }

        return (long)(offset - start);
    }

    private NbdProtocolException Violation(NbdOperation operation, string what) =>
        new($"{Server} broke the protocol: it sent {what} (answering {operation})");

    private static NbdServerErrorException ServerError(NbdOperation operation, NbdError error, string? message, ulong? errorOffset) =>
        new(operation.Command, (ulong)operation.Offset, operation.Length, error, message, errorOffset);

    private static string ChunkName(ReplyType type) => type switch
    {
        ReplyType.None => "NONE",
        ReplyType.OffsetData => "OFFSET_DATA",
        ReplyType.OffsetHole => "OFFSET_HOLE",
        ReplyType.BlockStatus => "BLOCK_STATUS",
        ReplyType.BlockStatusExtended => "BLOCK_STATUS_EXT",
        ReplyType.Error => "ERROR",
        ReplyType.ErrorOffset => "ERROR_OFFSET",
        _ => $"type {(ushort)type}",
    };
}
