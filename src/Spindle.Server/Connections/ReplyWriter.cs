using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using Spindle.Server.Transport;

namespace Spindle.Server.Connections;

/// <summary>
/// Serialises the replies of one connection onto its transport. Replies are queued by whichever thread finished
/// the request; the first thread to find the writer idle becomes the sender and drains everything queued in one
/// gathered send, looping while more arrives (flat combining). There is no writer thread to wake, and replies that
/// complete together leave in one system call.
/// </summary>
internal sealed class ReplyWriter
{
    private const int MaxSegmentsPerSend = 256;
    private const long MaxBytesPerSend = 4L * 1024 * 1024;

    private readonly ConcurrentQueue<TransmissionRequest> _queue = new();
    private readonly List<ArraySegment<byte>> _segments = new(MaxSegmentsPerSend + 8);
    private readonly List<TransmissionRequest> _batch = new(64);
    private readonly ConnectionTransport _transport;
    private readonly Action<TransmissionRequest> _release;
    private readonly Action<Exception> _onFault;
    private int _sending;
    private int _held;
    private volatile bool _faulted;

    public ReplyWriter(ConnectionTransport transport, Action<TransmissionRequest> release, Action<Exception> onFault)
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
        if (Volatile.Read(ref _held) == 0 && Interlocked.CompareExchange(ref _sending, 1, 0) == 0)
        {
            _ = DrainAsync();
        }
    }

    /// <summary>
    /// Holds sending back while the reader works through a batch of requests it executes itself, so their replies
    /// leave together; <see cref="Release"/> sends what accumulated.
    /// </summary>
    public void Hold() => Volatile.Write(ref _held, 1);

    public void Release()
    {
        Volatile.Write(ref _held, 0);
        if (!_queue.IsEmpty && Interlocked.CompareExchange(ref _sending, 1, 0) == 0)
        {
            _ = DrainAsync();
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask DrainAsync()
    {
        while (true)
        {
            long bytes = 0;
            while (_segments.Count < MaxSegmentsPerSend && bytes < MaxBytesPerSend && _queue.TryDequeue(out var request))
            {
                if (_faulted)
                {
                    _release(request);
                    continue;
                }

                _batch.Add(request);
                request.AppendSegments(_segments);
                bytes += request.ReplyLength;
            }

            if (_batch.Count > 0)
            {
                try
                {
                    await _transport.SendAsync(_segments, CancellationToken.None).ConfigureAwait(false);
                }
                catch (Exception exception)
                {
                    // The peer is gone (or the transport was aborted): every later reply is dropped, the reader stops.
                    _faulted = true;
                    _onFault(exception);
                }

                _segments.Clear();
                foreach (var sent in _batch)
                {
                    _release(sent);
                }

                _batch.Clear();
                continue;
            }

            // A full fence, not a release store: the check of the queue below must not be satisfied before the reset
            // is visible. Otherwise (a store-load reordering x86 allows) an Enqueue can slip in between, see
            // _sending still set and leave, while this sender reads the queue as empty and leaves too: that reply
            // would wait for the next one on the connection, and a client waiting for it hangs.
            Interlocked.Exchange(ref _sending, 0);

            // A reply queued between the last dequeue and the flag reset would otherwise wait for the next enqueue.
            if (_queue.IsEmpty || Volatile.Read(ref _held) != 0 || Interlocked.CompareExchange(ref _sending, 1, 0) != 0)
            {
                return;
            }
        }
    }
}
