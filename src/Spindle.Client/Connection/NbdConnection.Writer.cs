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

    /// <summary>
    /// The writer loop: takes every request queued since the last send and sends them together, the 28-byte headers
    /// packed into one buffer and each WRITE payload sent straight from the caller's memory (one sendmsg with an
    /// iovec per piece, no copy).
    /// </summary>
    private async Task WriteLoopAsync()
    {
        var reader = _sendQueue.Reader;
        var headers = GC.AllocateUninitializedArray<byte>(MaxBatchRequests * NbdLimits.RequestHeaderLength, pinned: true);
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
                    operation.ToRequest().WriteTo(headers.AsSpan(headerEnd));
                    headerEnd += NbdLimits.RequestHeaderLength;
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

    private static void EndSends(List<NbdOperation> batch)
    {
        foreach (var operation in batch)
        {
            operation.EndSend();
        }

        batch.Clear();
    }
}
