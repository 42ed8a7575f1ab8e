using System.Net.Sockets;
using System.Runtime.InteropServices;
using Spindle.Protocol;

namespace Spindle.Client.Connection;

internal sealed partial class NbdConnection
{
    /// <summary>Requests per gathered send.</summary>
    private const int MaxBatchRequests = 64;

    /// <summary>Write payload bytes per gathered send: enough to fill the socket, small enough to interleave.</summary>
    private const long MaxBatchBytes = 8L * 1024 * 1024;

    /// <summary>The most header bytes one request takes: an extended header and a BLOCK_STATUS payload naming one context.</summary>
    private const int MaxHeaderBytes = NbdLimits.ExtendedRequestHeaderLength + BlockStatusPayload.FixedLength + 4;

    /// <summary>
    /// The writer loop: takes every request queued since the last send and sends them together, the headers (28 or 32
    /// bytes) packed into one buffer and each WRITE payload sent straight from the caller's memory (one sendmsg with an
    /// iovec per piece, no copy).
    /// </summary>
    private async Task WriteLoopAsync()
    {
        var reader = _sendQueue.Reader;
        var extended = Export.ExtendedHeaders;
        var headers = GC.AllocateUninitializedArray<byte>(MaxBatchRequests * MaxHeaderBytes, pinned: true);
        var segments = new List<ArraySegment<byte>>((2 * MaxBatchRequests) + 1);
        var batch = new List<NbdOperation>(MaxBatchRequests);
        var token = _stopping.Token;
        try
        {
            while (await reader.WaitToReadAsync(token).ConfigureAwait(false))
            {
                var headerStart = 0;
                var headerEnd = 0;
                long bytes = 0;
                while (batch.Count < MaxBatchRequests && bytes < MaxBatchBytes && reader.TryRead(out var operation))
                {
                    if (!operation.TryBeginSend())
                    {
                        // Cancelled before it went out: the server never hears of it.
                        Complete(operation, null);
                        continue;
                    }

                    batch.Add(operation);
                    headerEnd += WriteHeader(operation, extended, headers.AsSpan(headerEnd));
                    if (!operation.HasPayload || operation.Payload.IsEmpty)
                    {
                        continue;
                    }

                    segments.Add(new ArraySegment<byte>(headers, headerStart, headerEnd - headerStart));
                    headerStart = headerEnd;
                    if (MemoryMarshal.TryGetArray(operation.Payload, out var array))
                    {
                        segments.Add(array);
                        bytes += array.Count;
                    }
                    else
                    {
                        // Native memory cannot join an array gather: send what is batched, then this payload alone.
                        await _transport.SendAsync(segments, token).ConfigureAwait(false);
                        segments.Clear();
                        await _transport.SendAsync(operation.Payload, token).ConfigureAwait(false);
                    }
                }

                if (headerEnd > headerStart)
                {
                    segments.Add(new ArraySegment<byte>(headers, headerStart, headerEnd - headerStart));
                }

                if (segments.Count > 0)
                {
                    await _transport.SendAsync(segments, token).ConfigureAwait(false);
                    segments.Clear();
                }

                EndSends(batch);
            }
        }
        catch (OperationCanceledException) when (token.IsCancellationRequested)
        {
            EndSends(batch);
        }
        catch (Exception exception) when (exception is SocketException or IOException or ObjectDisposedException)
        {
            EndSends(batch);
            Fail(new NbdConnectionException($"connection to {Server} lost while sending requests: {exception.Message}", exception));
        }
        catch (Exception exception)
        {
            // A bug, not the network: still fail every request rather than leave callers waiting.
            EndSends(batch);
            Fail(exception);
        }
    }

    /// <summary>
    /// Writes one request's header, and for a BLOCK_STATUS that only one of several negotiated contexts should answer
    /// (the server offers NBD_FLAG_BLOCK_STATUS_PAYLOAD) the payload naming it, with this connection's id for it.
    /// </summary>
    private int WriteHeader(NbdOperation operation, bool extended, Span<byte> destination)
    {
        if (extended && operation.Command == NbdCommand.BlockStatus && Export.CanFilterBlockStatus && Export.MetaContexts.Count > 1
            && operation.Context is { } context && Export.MetaContexts.TryGetValue(context, out var id))
        {
            var payloadLength = BlockStatusPayload.LengthFor(1);
            var request = new NbdRequest(operation.Flags | CommandFlags.PayloadLength, NbdCommand.BlockStatus, operation.Cookie, (ulong)operation.Offset, (ulong)payloadLength, extended: true);
            var written = request.WriteTo(destination);
            return written + BlockStatusPayload.Write(destination[written..], (ulong)operation.Length, [id]);
        }

        return operation.ToRequest(extended).WriteTo(destination);
    }

    private static void EndSends(List<NbdOperation> batch)
    {
        foreach (var operation in batch)
        {
            operation.EndSend();
        }

        batch.Clear();
    }
}
