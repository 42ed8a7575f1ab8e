using System.Buffers.Binary;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using Spindle.Protocol;

namespace Spindle.Client.Connection;

internal sealed partial class NbdConnection
{
    /// <summary>The largest BLOCK_STATUS chunk accepted: twice the 2^20 extents the spec says a server should stay under.</summary>
    private const long MaxBlockStatusPayload = 4 + (8L << 21);

    /// <summary>An ERROR_OFFSET chunk with the longest message the protocol allows.</summary>
    private const int MaxErrorPayload = 6 + NbdLimits.MaxStringLength + 8;

    /// <summary>
    /// The reader loop: one reply header (simple, 16 bytes) or chunk header (structured, 20 bytes) at a time, the
    /// request found by cookie, data received straight into the request's buffer. Any inconsistency is a protocol
    /// violation and ends the connection ("the client MUST hard-disconnect"); an end of stream fails every request
    /// still waiting.
    /// </summary>
    private async Task ReadLoopAsync()
    {
        var token = _stopping.Token;
        try
        {
            while (true)
            {
                await _receive.EnsureAsync(4, "a reply", token).ConfigureAwait(false);
                var magic = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span);
                if (magic == NbdMagic.SimpleReplyMagic)
                {
                    await ReadSimpleReplyAsync(token).ConfigureAwait(false);
                }
                else if (magic == NbdMagic.StructuredReplyMagic)
                {
                    await ReadChunkAsync(token).ConfigureAwait(false);
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
    private async ValueTask ReadChunkAsync(CancellationToken token)
    {
        if (!Export.StructuredReplies)
        {
            throw new NbdProtocolException($"{Server} sent a structured reply chunk although structured replies were not negotiated");
        }

        await _receive.EnsureAsync(StructuredReplyHeader.Length, "a reply", token).ConfigureAwait(false);
        StructuredReplyHeader.TryRead(_receive.Span, out var header);
        _receive.Consume(StructuredReplyHeader.Length);
        var operation = Lookup(header.Cookie, header.Type);
        var length = header.PayloadLength;
        try
        {
            switch (header.Type)
            {
                case ReplyType.None:
                    if (length != 0 || !header.IsDone)
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

                        if (length < 9 || length - 8 > operation.Length)
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

                case ReplyType.BlockStatus:
                    await ReadBlockStatusAsync(operation, length, token).ConfigureAwait(false);
                    break;

                case ReplyType.BlockStatusExtended:
                    throw Violation(operation, "a BLOCK_STATUS_EXT chunk although extended headers were not negotiated");

                case ReplyType.Error:
                case ReplyType.ErrorOffset:
                    {
                        if (length < 6 || length > MaxErrorPayload)
                        {
                            throw Violation(operation, $"an error chunk of {length} bytes");
                        }

                        await _receive.EnsureAsync((int)length, "a reply", token).ConfigureAwait(false);
                        if (!StructuredReplyChunks.TryReadError(_receive.Span[..(int)length], header.Type, out var error, out var message, out var errorOffset))
                        {
                            throw Violation(operation, $"a malformed {ChunkName(header.Type)} chunk (its message length overruns it)");
                        }

                        _receive.Consume((int)length);

                        // "error MUST be nonzero"; a zero is still a failure, and EINVAL is the catch-all.
                        operation.ReplyError ??= ServerError(operation, error == NbdError.None ? NbdError.InvalidArgument : error, message, errorOffset);
                        break;
                    }

                default:
                    if (((ushort)header.Type & 0x8000) == 0)
                    {
                        throw Violation(operation, $"a chunk of unknown type {(ushort)header.Type}");
                    }

                    // An unknown error type: the request failed; skip the payload and carry on (proto.md).
                    if (length > MaxErrorPayload)
                    {
                        throw Violation(operation, $"an error chunk of unknown type {(ushort)header.Type} and {length} bytes");
                    }

                    await _receive.EnsureAsync((int)length, "a reply", token).ConfigureAwait(false);
                    var unknownMessage = StructuredReplyChunks.TryReadError(_receive.Span[..(int)length], ReplyType.Error, out _, out var text, out _) ? text : null;
                    _receive.Consume((int)length);
                    operation.ReplyError ??= ServerError(operation, NbdError.InvalidArgument,
                        $"unknown error chunk type 0x{(ushort)header.Type:x4}" + (string.IsNullOrEmpty(unknownMessage) ? string.Empty : ": " + unknownMessage), null);
                    break;
            }
        }
        catch (EndOfStreamException exception)
        {
            throw new EndOfStreamException($"{exception.Message} (in the reply to {operation})", exception);
        }

        if (header.IsDone)
        {
            FinishReply(operation);
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReadBlockStatusAsync(NbdOperation operation, uint length, CancellationToken token)
    {
        if (operation.Command != NbdCommand.BlockStatus)
        {
            throw Violation(operation, "a BLOCK_STATUS chunk for a request that is not BLOCK_STATUS");
        }

        if (length < 12 || (length - 4) % 8 != 0 || length > MaxBlockStatusPayload)
        {
            throw Violation(operation, $"a BLOCK_STATUS chunk of {length} bytes (it must be 4 + 8 n, n >= 1)");
        }

        await _receive.EnsureAsync(4, "a reply", token).ConfigureAwait(false);
        var contextId = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span);
        _receive.Consume(4);
        if (!_contextNames.TryGetValue(contextId, out var name))
        {
            throw Violation(operation, $"a BLOCK_STATUS chunk for context id {contextId}, which was never selected");
        }

        var wanted = name == operation.Context;
        if (wanted && operation.SawContext)
        {
            throw Violation(operation, $"two BLOCK_STATUS chunks for context '{name}'");
        }

        var count = (length - 4) / 8;
        var extents = operation.Extents!;
        for (var i = 0u; i < count; i++)
        {
            await _receive.EnsureAsync(8, "a reply", token).ConfigureAwait(false);
            var extentLength = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span);
            var flags = BinaryPrimitives.ReadUInt32BigEndian(_receive.Span[4..]);
            _receive.Consume(8);
            if (extentLength == 0)
            {
                throw Violation(operation, $"a BLOCK_STATUS extent of length 0 for context '{name}'");
            }

            if (wanted)
            {
                extents.Add(new BlockStatusExtent(extentLength, flags));
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
