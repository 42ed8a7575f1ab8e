using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Wire;

namespace Spindle.Benchmarks;

/// <summary>
/// An in-memory transport that hands the server a prepared handshake and then, on each <see cref="RunBatch"/>, a
/// prepared batch of requests, counting the replies that come back. It allocates nothing per batch, so what a
/// benchmark reports as allocated is the server's. Blocking, so the connection runs on a thread of its own.
/// </summary>
internal sealed class ReplayTransport : Transport
{
    private readonly byte[] _handshake;
    private readonly byte[] _batch;
    private readonly int _repliesPerBatch;
    private readonly SemaphoreSlim _go = new(0);
    private readonly ManualResetEventSlim _done = new(false);
    private int _handshakePosition;
    private int _batchPosition = int.MaxValue;
    private int _replies;
    private volatile bool _closed;

    public ReplayTransport(byte[] handshake, byte[] batch, int repliesPerBatch)
    {
        _handshake = handshake;
        _batch = batch;
        _repliesPerBatch = repliesPerBatch;
    }

    public override Task RunAsync(Func<Task> connection, string name) => RunOnDedicatedThread(connection, name);

    public override ValueTask ReaderWaitAsync(ValueTask pending) => BlockOn(pending);

    protected override Stream OpenStream() => throw new NotSupportedException("no TLS over a replay");

    public override string RemoteDescription => "replay";

    /// <summary>Replies to the handshake (option replies, export info) seen so far, in bytes.</summary>
    public long HandshakeReplyBytes { get; private set; }

    /// <summary>Feeds one batch of requests and waits until every one of them was answered.</summary>
    public void RunBatch()
    {
        _done.Reset();
        Volatile.Write(ref _replies, 0);
        Volatile.Write(ref _batchPosition, 0);
        _go.Release();
        if (!_done.Wait(TimeSpan.FromSeconds(30)))
        {
            throw new TimeoutException("the server did not answer the batch");
        }
    }

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken)
    {
        if (_handshakePosition < _handshake.Length)
        {
            var count = Math.Min(buffer.Length, _handshake.Length - _handshakePosition);
            _handshake.AsSpan(_handshakePosition, count).CopyTo(buffer.Span);
            _handshakePosition += count;
            return new ValueTask<int>(count);
        }

        // A batch may have been released before the reader got here: wait until there is really something to give.
        while (Volatile.Read(ref _batchPosition) >= _batch.Length)
        {
            _go.Wait(cancellationToken);
            if (_closed)
            {
                return new ValueTask<int>(0);
            }
        }

        var take = Math.Min(buffer.Length, _batch.Length - _batchPosition);
        _batch.AsSpan(_batchPosition, take).CopyTo(buffer.Span);
        _batchPosition += take;
        return new ValueTask<int>(take);
    }

    public override ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        HandshakeReplyBytes += buffer.Length;
        return ValueTask.CompletedTask;
    }

    public override ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken)
    {
        var replies = 0;
        for (var i = 0; i < buffers.Count; i++)
        {
            var segment = buffers[i].AsSpan();
            if (segment.Length < 8)
            {
                continue;
            }

            var magic = BinaryPrimitives.ReadUInt32BigEndian(segment);
            if (magic == NbdMagic.SimpleReplyMagic ||
                (magic == NbdMagic.StructuredReplyMagic && (BinaryPrimitives.ReadUInt16BigEndian(segment[4..]) & (ushort)ReplyFlags.Done) != 0))
            {
                replies++;
            }
        }

        if (Interlocked.Add(ref _replies, replies) >= _repliesPerBatch)
        {
            _done.Set();
        }

        return ValueTask.CompletedTask;
    }

    public override void CancelReceive() => Close();

    public override void Abort() => Close();

    public override ValueTask DisposeAsync()
    {
        Close();
        return ValueTask.CompletedTask;
    }

    private void Close()
    {
        _closed = true;
        _go.Release();
    }
}
