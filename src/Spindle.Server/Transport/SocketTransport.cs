using System.Net;
using System.Net.Sockets;
using System.Threading.Tasks.Sources;

namespace Spindle.Server.Transport;

/// <summary>
/// A transport over a connected socket. Receives go straight into the caller's buffer; gathered sends use one
/// reusable <see cref="SocketAsyncEventArgs"/> so a batch of replies leaves in one sendmsg, with no allocation.
/// </summary>
public sealed class SocketTransport : ConnectionTransport
{
    private readonly Socket _socket;
    private readonly GatherSendArgs _gather = new();
    private int _aborted;

    public SocketTransport(Socket socket, bool blocking = false)
    {
        ArgumentNullException.ThrowIfNull(socket);
        _socket = socket;
        IsBlocking = blocking;
        RemoteIPEndPoint = socket.RemoteEndPoint as IPEndPoint;
        RemoteDescription = socket.RemoteEndPoint switch
        {
            IPEndPoint ip => ip.ToString(),
            UnixDomainSocketEndPoint => "unix",
            { } other => other.ToString() ?? "unknown",
            null => "unknown",
        };
    }

    public Socket Socket => _socket;

    /// <summary>
    /// Blocking mode: receives and sends are plain blocking system calls made on the calling thread, which the
    /// connection dedicates to the socket. One wake-up per message instead of an epoll event plus a pool hop.
    /// </summary>
    public override bool IsBlocking { get; }

    /// <summary>Blocking mode: sends what it can of the segments (after <paramref name="skip"/> bytes) without waiting.</summary>
    internal long TrySend(List<ArraySegment<byte>> segments, long skip) => NativeSocket.Send(_socket, segments, skip, dontWait: true);

    /// <summary>Blocking mode: sends all of the segments after <paramref name="skip"/> bytes, waiting as needed.</summary>
    internal void SendAll(List<ArraySegment<byte>> segments, long skip, long total)
    {
        while (skip < total)
        {
            skip += NativeSocket.Send(_socket, segments, skip, dontWait: false);
        }
    }

    public override void CancelReceive()
    {
        try
        {
            // On Linux a shutdown of the receive side wakes a blocked recv with end of stream.
            _socket.Shutdown(SocketShutdown.Receive);
        }
        catch (SocketException)
        {
        }
        catch (ObjectDisposedException)
        {
        }
    }

    public override string RemoteDescription { get; }

    public override IPEndPoint? RemoteIPEndPoint { get; }

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken)
    {
        if (!IsBlocking)
        {
            return _socket.ReceiveAsync(buffer, SocketFlags.None, cancellationToken);
        }

        cancellationToken.ThrowIfCancellationRequested();
        return new ValueTask<int>(ReceiveBlocking(buffer.Span));
    }

    /// <summary>
    /// How long a blocking receive polls before it sleeps. A client waiting for a reply usually sends its next
    /// request within a few microseconds; catching it without sleeping saves the thread a wake-up, which costs tens
    /// of microseconds when it must come from another CPU (in virtual machines especially). Zero turns polling off.
    /// </summary>
    public static TimeSpan ReceivePollTime { get; set; } = TimeSpan.FromMicroseconds(50);

    private int ReceiveBlocking(Span<byte> buffer)
    {
        var poll = ReceivePollTime;
        if (poll > TimeSpan.Zero)
        {
            var deadline = System.Diagnostics.Stopwatch.GetTimestamp() + (long)(poll.TotalSeconds * System.Diagnostics.Stopwatch.Frequency);
            // poll(2) with no timeout: true once data, the end of the stream or an error is there to receive.
            for (var attempt = 0; attempt < 1000 && !_socket.Poll(0, SelectMode.SelectRead); attempt++)
            {
                if (System.Diagnostics.Stopwatch.GetTimestamp() > deadline)
                {
                    break;
                }

                Thread.SpinWait(8);
            }
        }

        return _socket.Receive(buffer, SocketFlags.None);
    }

    public override async ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        if (IsBlocking)
        {
            while (!buffer.IsEmpty)
            {
                buffer = buffer[_socket.Send(buffer.Span, SocketFlags.None)..];
            }

            return;
        }

        while (!buffer.IsEmpty)
        {
            var sent = await _socket.SendAsync(buffer, SocketFlags.None, cancellationToken).ConfigureAwait(false);
            buffer = buffer[sent..];
        }
    }

    public override ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(buffers);
        if (buffers.Count == 1)
        {
            return SendAsync(buffers[0].AsMemory(), cancellationToken);
        }

        var total = 0L;
        for (var i = 0; i < buffers.Count; i++)
        {
            total += buffers[i].Count;
        }

        if (IsBlocking && buffers is List<ArraySegment<byte>> list)
        {
            SendAll(list, 0, total);
            return ValueTask.CompletedTask;
        }

        var pending = _gather.SendAsync(_socket, buffers);
        if (pending.IsCompletedSuccessfully)
        {
            var sent = pending.Result;
            return sent == total ? ValueTask.CompletedTask : SendRemainderAsync(buffers, sent, cancellationToken);
        }

        return AwaitGatherAsync(pending, buffers, total, cancellationToken);
    }

    public override ValueTask ShutdownSendAsync()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Send);
        }
        catch (SocketException)
        {
            // Already reset by the peer: nothing left to shut down.
        }
        catch (ObjectDisposedException)
        {
        }

        return ValueTask.CompletedTask;
    }

    public override void Abort()
    {
        if (Interlocked.Exchange(ref _aborted, 1) != 0)
        {
            return;
        }

        try
        {
            // Linger 0 turns close into a reset, so a peer blocked on us notices at once.
            _socket.LingerState = new LingerOption(true, 0);
        }
        catch (SocketException)
        {
        }
        catch (ObjectDisposedException)
        {
        }

        _socket.Dispose();
    }

    public override ValueTask DisposeAsync()
    {
        _socket.Dispose();
        _gather.Dispose();
        return ValueTask.CompletedTask;
    }

    private async ValueTask AwaitGatherAsync(ValueTask<int> pending, IList<ArraySegment<byte>> buffers, long total, CancellationToken cancellationToken)
    {
        var sent = await pending.ConfigureAwait(false);
        if (sent != total)
        {
            await SendRemainderAsync(buffers, sent, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>A short gathered send (rare: the kernel normally takes all of it) finishes segment by segment.</summary>
    private async ValueTask SendRemainderAsync(IList<ArraySegment<byte>> buffers, long alreadySent, CancellationToken cancellationToken)
    {
        for (var i = 0; i < buffers.Count; i++)
        {
            var segment = buffers[i];
            if (alreadySent >= segment.Count)
            {
                alreadySent -= segment.Count;
                continue;
            }

            await SendAsync(segment.AsMemory((int)alreadySent), cancellationToken).ConfigureAwait(false);
            alreadySent = 0;
        }
    }

    /// <summary>A reusable awaitable gathered send.</summary>
    private sealed class GatherSendArgs : SocketAsyncEventArgs, IValueTaskSource<int>
    {
        private ManualResetValueTaskSourceCore<int> _source;

        public GatherSendArgs()
            : base(unsafeSuppressExecutionContextFlow: true)
        {
        }

        public ValueTask<int> SendAsync(Socket socket, IList<ArraySegment<byte>> buffers)
        {
            _source.Reset();
            BufferList = buffers;
            if (socket.SendAsync(this))
            {
                return new ValueTask<int>(this, _source.Version);
            }

            var result = SocketError == SocketError.Success
                ? new ValueTask<int>(BytesTransferred)
                : ValueTask.FromException<int>(new SocketException((int)SocketError));
            BufferList = null;
            return result;
        }

        protected override void OnCompleted(SocketAsyncEventArgs e)
        {
            BufferList = null;
            if (SocketError == SocketError.Success)
            {
                _source.SetResult(BytesTransferred);
            }
            else
            {
                _source.SetException(new SocketException((int)SocketError));
            }
        }

        public int GetResult(short token) => _source.GetResult(token);

        public ValueTaskSourceStatus GetStatus(short token) => _source.GetStatus(token);

        public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
            _source.OnCompleted(continuation, state, token, flags);
    }
}
