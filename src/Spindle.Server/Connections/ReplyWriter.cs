using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using Spindle.Wire;

namespace Spindle.Server.Connections;

/// <summary>
/// Serialises the replies of one connection onto its transport. Replies are queued by whichever thread finished
/// the request; the first thread to find the writer idle becomes the sender and drains everything queued in one
/// gathered send, looping while more arrives (flat combining). There is no writer thread to wake, and replies that
/// complete together leave in one system call.
/// </summary>
/// <remarks>
/// A send that cannot finish at once (a client reading slowly, or one that sends without reading) completes later
/// on its own: a blocking socket hands the rest of the batch to a pool thread, an asynchronous one to the socket
/// engine. The sender role moves with it, so the connection's reader never stops reading because of a slow reader
/// at the other end.
/// </remarks>
internal sealed class ReplyWriter
{
    private const int MaxSegmentsPerSend = 512;
    private const long MaxBytesPerSend = 4L * 1024 * 1024;

    private readonly ConcurrentQueue<TransmissionRequest> _queue = new();
    private readonly List<ArraySegment<byte>> _segments = new(MaxSegmentsPerSend + 8);
    private readonly List<TransmissionRequest> _batch = new(64);
    private readonly Transport _transport;
    private readonly Action<TransmissionRequest> _release;
    private readonly Action<Exception> _onFault;
    private long _batchBytes;
    private int _sending;
    private int _held;
    private volatile bool _faulted;

    public ReplyWriter(Transport transport, Action<TransmissionRequest> release, Action<Exception> onFault)
    {
        _transport = transport;
        _release = release;
        _onFault = onFault;
    }

    public bool IsFaulted => _faulted;

    /// <summary>Queues a built reply and sends it, together with anything else queued, unless another thread is sending.</summary>
    public void Enqueue(TransmissionRequest request)
    {
        _queue.Enqueue(request);

        // The enqueue's last write is a release store: fence before reading the flags (see FinishSending).
        Interlocked.MemoryBarrier();
        if (Volatile.Read(ref _held) == 0)
        {
            TryStartSending();
        }
    }

    /// <summary>
    /// Holds replies back while the reader works through a burst of requests that are already buffered, so their
    /// replies leave together; <see cref="Release"/> sends what accumulated. The reader releases before anything
    /// that may block.
    /// </summary>
    public void Hold() => Volatile.Write(ref _held, 1);

    public void Release()
    {
        // A full fence between clearing the hold and looking at the queue (see FinishSending).
        Interlocked.Exchange(ref _held, 0);
        if (!_queue.IsEmpty)
        {
            TryStartSending();
        }
    }

    private void TryStartSending()
    {
        if (Interlocked.CompareExchange(ref _sending, 1, 0) != 0)
        {
            return;
        }

        _ = DrainAsync();
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask DrainAsync()
    {
        while (true)
        {
            if (CollectBatch())
            {
                if (!_faulted)
                {
                    try
                    {
                        // Usually complete at once (the socket took it all): then this loop runs on without awaiting.
                        var send = _transport.SendAsync(_segments, CancellationToken.None);
                        if (!send.IsCompletedSuccessfully)
                        {
                            await send.ConfigureAwait(false);
                        }
                    }
                    catch (Exception exception)
                    {
                        Fault(exception);
                    }
                }

                CompleteBatch();
                continue;
            }

            if (FinishSending())
            {
                return;
            }
        }
    }

    /// <summary>Moves queued replies into the batch, up to the size of one send. False when there was nothing.</summary>
    private bool CollectBatch()
    {
        _batchBytes = 0;
        while (_segments.Count < MaxSegmentsPerSend && _batchBytes < MaxBytesPerSend && _queue.TryDequeue(out var request))
        {
            if (_faulted)
            {
                _release(request);
                continue;
            }

            _batch.Add(request);
            request.AppendSegments(_segments);
            _batchBytes += request.ReplyLength;
        }

        return _batch.Count > 0;
    }

    private void CompleteBatch()
    {
        _segments.Clear();
        foreach (var sent in _batch)
        {
            _release(sent);
        }

        _batch.Clear();
    }

    /// <summary>Gives up the sender role. False when a reply slipped in meanwhile and this thread took the role back.</summary>
    /// <remarks>
    /// Every hand-off here is a pair "write my flag, then read the other side's state" against "write the queue, then
    /// read my flag". Each write is followed by a full fence (Interlocked), never a release store alone: x86 lets a
    /// later load pass an earlier store, and then both sides could conclude the other will send, leaving a reply
    /// queued until the next one arrives (a client with one request in flight would hang).
    /// </remarks>
    private bool FinishSending()
    {
        Interlocked.Exchange(ref _sending, 0);

        // A reply queued between the last dequeue and the flag reset would otherwise wait for the next enqueue.
        return _queue.IsEmpty || Volatile.Read(ref _held) != 0 || Interlocked.CompareExchange(ref _sending, 1, 0) != 0;
    }

    private void Fault(Exception exception)
    {
        // The peer is gone (or the transport was aborted): every later reply is dropped, the reader stops.
        _faulted = true;
        _onFault(exception);
    }
}
