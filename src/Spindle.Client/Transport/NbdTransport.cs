using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Threading.Tasks.Sources;

namespace Spindle.Client.Transport;

/// <summary>
/// The byte stream one connection runs over: a socket, or TLS over that socket after NBD_OPT_STARTTLS (TLS is a
/// transport swap). One reader and one writer may use it at the same time; neither call is made concurrently with
/// itself.
/// </summary>
internal abstract class NbdTransport : IAsyncDisposable
{
    /// <summary>The server this transport reaches, for messages ("127.0.0.1:10809", "unix:/run/nbd.sock").</summary>
    public abstract string Description { get; }

    /// <summary>Reads up to <paramref name="buffer"/>.Length bytes; 0 means the server closed its side.</summary>
    public abstract ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken);

    /// <summary>Sends all of <paramref name="buffer"/>.</summary>
    public abstract ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken);

    /// <summary>Sends all of <paramref name="buffers"/>, in one system call where the transport can gather.</summary>
    public abstract ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken);

    /// <summary>Closes the sending direction (the server sees end of stream after what was sent).</summary>
    public abstract ValueTask ShutdownSendAsync();

    /// <summary>The transport's bytes as a <see cref="Stream"/>, for TLS to run over.</summary>
    public abstract Stream AsStream();

    /// <summary>Closes at once, failing any pending receive or send.</summary>
    public abstract void Abort();

    public abstract ValueTask DisposeAsync();
}

/// <summary>
/// A connected TCP or Unix socket. Receives land straight in the caller's memory; a gathered send goes out in one
/// sendmsg through a reusable <see cref="SocketAsyncEventArgs"/>, with no allocation.
/// </summary>
internal sealed class SocketTransport : NbdTransport
{
    private readonly Socket _socket;
    private readonly GatherSender _gather = new();
    private int _closed;

    public SocketTransport(Socket socket, string description)
    {
        _socket = socket;
        Description = description;
    }

    public override string Description { get; }

    public override Stream AsStream() => new NetworkStream(_socket, ownsSocket: false);

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken) =>
        _socket.ReceiveAsync(buffer, SocketFlags.None, cancellationToken);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public override async ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        while (!buffer.IsEmpty)
        {
            var sent = await _socket.SendAsync(buffer, SocketFlags.None, cancellationToken).ConfigureAwait(false);
            buffer = buffer[sent..];
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public override async ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken)
    {
        if (buffers.Count == 1)
        {
            await SendAsync(buffers[0].AsMemory(), cancellationToken).ConfigureAwait(false);
            return;
        }

        long total = 0;
        for (var i = 0; i < buffers.Count; i++)
        {
            total += buffers[i].Count;
        }

        // Cancellation reaches a gathered send by closing the socket (Abort), which fails it.
        var sent = await _gather.SendAsync(_socket, buffers).ConfigureAwait(false);
        if (sent == total)
        {
            return;
        }

        // A short gathered send is rare (the kernel normally takes it all); finish segment by segment.
        for (var i = 0; i < buffers.Count; i++)
        {
            var segment = buffers[i];
            if (sent >= segment.Count)
            {
                sent -= segment.Count;
                continue;
            }

            await SendAsync(segment.AsMemory(sent), cancellationToken).ConfigureAwait(false);
            sent = 0;
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
            // Already reset or closed: nothing left to shut down.
        }

        return ValueTask.CompletedTask;
    }

    public override void Abort()
    {
        if (Interlocked.Exchange(ref _closed, 1) != 0)
        {
            return;
        }

        try
        {
            // Linger 0 turns close into a reset, so a server blocked on us notices at once.
            _socket.LingerState = new LingerOption(true, 0);
        }
        catch (Exception exception) when (exception is SocketException or ObjectDisposedException)
        {
        }

        _socket.Dispose();
    }

    public override ValueTask DisposeAsync()
    {
        Interlocked.Exchange(ref _closed, 1);
        _socket.Dispose();
        _gather.Dispose();
        return ValueTask.CompletedTask;
    }

    private sealed class GatherSender : SocketAsyncEventArgs, IValueTaskSource<int>
    {
        private ManualResetValueTaskSourceCore<int> _source;

        public GatherSender()
            : base(unsafeSuppressExecutionContextFlow: true)
        {
            _source.RunContinuationsAsynchronously = true;
        }

        public ValueTask<int> SendAsync(Socket socket, IList<ArraySegment<byte>> buffers)
        {
            _source.Reset();
            BufferList = buffers;
            bool pending;
            try
            {
                pending = socket.SendAsync(this);
            }
            catch
            {
                BufferList = null;
                throw;
            }

            if (pending)
            {
                return new ValueTask<int>(this, _source.Version);
            }

            BufferList = null;
            return SocketError == SocketError.Success
                ? new ValueTask<int>(BytesTransferred)
                : ValueTask.FromException<int>(new SocketException((int)SocketError));
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

/// <summary>A transport over any duplex <see cref="Stream"/> (tests); gathered sends are written one by one.</summary>
internal sealed class StreamTransport(Stream stream, string description) : NbdTransport
{
    public override string Description { get; } = description;

    public override Stream AsStream() => stream;

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken) =>
        stream.ReadAsync(buffer, cancellationToken);

    public override async ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        await stream.WriteAsync(buffer, cancellationToken).ConfigureAwait(false);
        await stream.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    public override async ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken)
    {
        foreach (var segment in buffers)
        {
            await stream.WriteAsync(segment.AsMemory(), cancellationToken).ConfigureAwait(false);
        }

        await stream.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    public override ValueTask ShutdownSendAsync() => ValueTask.CompletedTask;

    public override void Abort() => stream.Dispose();

    public override ValueTask DisposeAsync() => stream.DisposeAsync();
}

/// <summary>Opens the socket an <see cref="NbdUri"/> names.</summary>
internal static class TransportConnector
{
    public static async Task<NbdTransport> ConnectAsync(NbdUri uri, TimeSpan timeout, CancellationToken cancellationToken)
    {
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (timeout != Timeout.InfiniteTimeSpan)
        {
            deadline.CancelAfter(timeout);
        }

        try
        {
            return uri.Transport == NbdTransportKind.Unix
                ? await ConnectUnixAsync(uri, deadline.Token).ConfigureAwait(false)
                : await ConnectTcpAsync(uri, deadline.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new NbdConnectionException($"cannot connect to {uri.Target}: no answer within {timeout.TotalSeconds:0.#} s");
        }
    }

    private static async Task<NbdTransport> ConnectUnixAsync(NbdUri uri, CancellationToken cancellationToken)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(uri.SocketPath!), cancellationToken).ConfigureAwait(false);
            return new SocketTransport(socket, uri.Target);
        }
        catch (SocketException exception)
        {
            socket.Dispose();
            throw new NbdConnectionException($"cannot connect to {uri.Target}: {Reason(exception)}", exception);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    private static async Task<NbdTransport> ConnectTcpAsync(NbdUri uri, CancellationToken cancellationToken)
    {
        IPAddress[] addresses;
        if (IPAddress.TryParse(uri.Host, out var literal))
        {
            addresses = [literal];
        }
        else
        {
            try
            {
                addresses = await Dns.GetHostAddressesAsync(uri.Host!, cancellationToken).ConfigureAwait(false);
            }
            catch (SocketException exception)
            {
                throw new NbdConnectionException($"cannot resolve host '{uri.Host}': {exception.Message}", exception);
            }

            if (addresses.Length == 0)
            {
                throw new NbdConnectionException($"cannot resolve host '{uri.Host}': no addresses");
            }
        }

        SocketException? last = null;
        foreach (var address in addresses)
        {
            var socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                // proto.md: both sides SHOULD disable Nagle; requests are small and latency-bound.
                socket.NoDelay = true;
                EnableKeepAlive(socket);
                await socket.ConnectAsync(new IPEndPoint(address, uri.Port), cancellationToken).ConfigureAwait(false);
                return new SocketTransport(socket, uri.Target);
            }
            catch (SocketException exception)
            {
                socket.Dispose();
                last = exception;
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        }

        throw new NbdConnectionException($"cannot connect to {uri.Target}: {Reason(last!)}", last!);
    }

    /// <summary>
    /// TCP keepalive: a peer whose machine vanished (power cut, network partition: no FIN, no RST) is detected on an
    /// idle connection in about 15 + 4 x 5 seconds, so a reconnecting client notices without a request timing out.
    /// Keepalive probes are answered by the peer's kernel, so a slow but live server is never mistaken for a dead one.
    /// </summary>
    private static void EnableKeepAlive(Socket socket)
    {
        try
        {
            socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, 15);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, 5);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, 4);
        }
        catch (SocketException)
        {
            // A platform without these options: the reply timeout still detects a dead peer.
        }
    }

    private static string Reason(SocketException exception) => exception.SocketErrorCode switch
    {
        SocketError.ConnectionRefused => "connection refused (is the server running and listening there?)",
        SocketError.AddressNotAvailable or SocketError.HostUnreachable or SocketError.NetworkUnreachable => exception.Message,
        _ => exception.Message,
    };
}
