using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;

namespace Spindle.Wire;

/// <summary>
/// A connected TCP or Unix socket. Receives land straight in the caller's memory; a gathered send leaves in one
/// sendmsg. Asynchronous by default; a blocking socket (the server's default, <see cref="SocketTransport(Socket, bool, string?)"/>)
/// makes plain blocking system calls on a thread the connection owns: one wake-up per message instead of an epoll
/// event plus a pool hop.
/// </summary>
public sealed partial class SocketTransport : Transport
{
    private readonly Socket _socket;
    private readonly bool _blocking;
    private readonly GatherSender _gather = new();
    private BlockingSend? _blockingSend;
    private CancellationToken _receiveToken;
    private CancellationTokenRegistration _receiveRegistration;
    private int _aborted;
    private ReceivePoller _poller;

    /// <param name="socket">A connected socket; the transport owns it.</param>
    /// <param name="blocking">Blocking system calls on the connection's own thread (see <see cref="RunAsync"/>).</param>
    /// <param name="description">How to name the peer; by default its address, or "unix".</param>
    public SocketTransport(Socket socket, bool blocking = false, string? description = null)
    {
        ArgumentNullException.ThrowIfNull(socket);
        _socket = socket;
        _blocking = blocking;
        RemoteIPEndPoint = socket.RemoteEndPoint as IPEndPoint;
        RemoteDescription = description ?? socket.RemoteEndPoint switch
        {
            IPEndPoint ip => ip.ToString(),
            UnixDomainSocketEndPoint => "unix",
            { } other => other.ToString() ?? "unknown",
            null => "unknown",
        };
    }

    /// <summary>
    /// How long a blocking receive polls before it sleeps. A client waiting for a reply usually sends its next
    /// request within a few microseconds; catching it without sleeping saves the thread a wake-up, which costs tens
    /// of microseconds when it must come from another CPU (in virtual machines especially). Polling backs off while
    /// it does not pay (see <see cref="ReceivePoller"/>). Zero turns polling off.
    /// </summary>
    public static TimeSpan ReceivePollTime { get; set; } = TimeSpan.FromMicroseconds(50);

    public override string RemoteDescription { get; }

    public override IPEndPoint? RemoteIPEndPoint { get; }

    internal override bool IsBlocking => _blocking;

    public override Task RunAsync(Func<Task> connection, string name) =>
        _blocking ? RunOnDedicatedThread(connection, name) : base.RunAsync(connection, name);

    public override ValueTask ReaderWaitAsync(ValueTask pending) => _blocking ? BlockOn(pending) : pending;

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken)
    {
        if (!_blocking)
        {
            return _socket.ReceiveAsync(buffer, SocketFlags.None, cancellationToken);
        }

        cancellationToken.ThrowIfCancellationRequested();
        WakeReceiveOn(cancellationToken);
        return new ValueTask<int>(ReceiveBlocking(buffer.Span));
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public override async ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        if (_blocking)
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

        if (_blocking)
        {
            return SendGatheredBlocking(buffers, total);
        }

        // Cancellation reaches a gathered send by closing the socket (Abort), which fails it.
        var pending = _gather.SendAsync(_socket, buffers);
        if (pending.IsCompletedSuccessfully)
        {
            var sent = pending.Result;
            return sent == total ? ValueTask.CompletedTask : SendRemainderAsync(buffers, sent, cancellationToken);
        }

        return AwaitGatherAsync(pending, buffers, total, cancellationToken);
    }

    public override void CancelReceive()
    {
        try
        {
            // On Linux a shutdown of the receive side wakes a blocked recv with end of stream.
            _socket.Shutdown(SocketShutdown.Receive);
        }
        catch (Exception exception) when (exception is SocketException or ObjectDisposedException)
        {
        }
    }

    public override ValueTask ShutdownSendAsync()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Send);
        }
        catch (Exception exception) when (exception is SocketException or ObjectDisposedException)
        {
            // Already reset by the peer or closed: nothing left to shut down.
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
        catch (Exception exception) when (exception is SocketException or ObjectDisposedException)
        {
        }

        _socket.Dispose();
    }

    public override ValueTask DisposeAsync()
    {
        Interlocked.Exchange(ref _aborted, 1);
        _receiveRegistration.Dispose();
        _socket.Dispose();
        _gather.Dispose();
        return ValueTask.CompletedTask;
    }

    protected internal override Stream OpenStream() => new NetworkStream(_socket, ownsSocket: false);

    /// <summary>
    /// A blocking receive does not see tokens: a token that is cancelled shuts the receive side, which wakes it with
    /// end of stream. Registered once per token, not per receive.
    /// </summary>
    private void WakeReceiveOn(CancellationToken cancellationToken)
    {
        if (!cancellationToken.CanBeCanceled || cancellationToken == _receiveToken)
        {
            return;
        }

        _receiveRegistration.Dispose();
        _receiveToken = cancellationToken;
        _receiveRegistration = cancellationToken.UnsafeRegister(static state => ((SocketTransport)state!).CancelReceive(), this);
    }

    private int ReceiveBlocking(Span<byte> buffer)
    {
        // poll(2) with no timeout: true once data, the end of the stream or an error is there to receive.
        _poller.Poll(ReceivePollTime, _socket, static socket => socket.Poll(0, SelectMode.SelectRead));
        return _socket.Receive(buffer, SocketFlags.None);
    }

    /// <summary>
    /// Blocking gathered send (every segment must be a pinned array, as <see cref="BufferPool"/>'s are, since sendmsg
    /// is handed their addresses unpinned): sendmsg without waiting first; when the socket is full (a client reading slowly, or one
    /// that sends without reading) a pool thread finishes the batch, blocking, so the caller (often the connection's
    /// reader) carries on.
    /// </summary>
    private ValueTask SendGatheredBlocking(IList<ArraySegment<byte>> buffers, long total)
    {
        var sent = NativeSocket.Send(_socket, buffers, 0, dontWait: true);
        if (sent == total)
        {
            return ValueTask.CompletedTask;
        }

        var send = _blockingSend ??= new BlockingSend(this);
        return send.Start(buffers, sent, total);
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
}
