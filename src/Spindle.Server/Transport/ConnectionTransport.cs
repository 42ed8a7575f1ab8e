using System.Net;

namespace Spindle.Server.Transport;

/// <summary>
/// The byte stream a connection runs over: a socket, a TLS stream, or an in-memory stream in tests. One reader and
/// one writer may use it concurrently; neither call is made concurrently with itself.
/// </summary>
public abstract class ConnectionTransport : IAsyncDisposable
{
    /// <summary>Where the peer is, for logs and access rules ("unix" for a Unix socket peer).</summary>
    public abstract string RemoteDescription { get; }

    /// <summary>The peer's IP endpoint, or null when it has none (Unix socket, in-memory).</summary>
    public virtual IPEndPoint? RemoteIPEndPoint => null;

    /// <summary>Reads up to <paramref name="buffer"/>.Length bytes; 0 means the peer closed its side.</summary>
    public abstract ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken);

    /// <summary>Sends all of <paramref name="buffer"/>.</summary>
    public abstract ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken);

    /// <summary>Sends all of <paramref name="buffers"/>, in one system call where the transport can gather.</summary>
    public abstract ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken);

    /// <summary>
    /// Blocking transports make real blocking system calls in <see cref="ReceiveAsync"/> and the sends, so the
    /// connection runs them on a thread of its own; their receives ignore cancellation tokens and are woken by
    /// <see cref="CancelReceive"/> or <see cref="Abort"/> instead.
    /// </summary>
    public virtual bool IsBlocking => false;

    /// <summary>Makes a pending and every later receive return end of stream, while sending keeps working.</summary>
    public virtual void CancelReceive()
    {
    }

    /// <summary>Closes the sending direction once everything queued is out (a graceful end of stream).</summary>
    public virtual ValueTask ShutdownSendAsync() => ValueTask.CompletedTask;

    /// <summary>Closes the connection at once, failing any pending receive or send.</summary>
    public abstract void Abort();

    public abstract ValueTask DisposeAsync();
}
