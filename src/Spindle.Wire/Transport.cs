using System.Net;

namespace Spindle.Wire;

/// <summary>
/// The byte stream one NBD connection runs over: a socket, TLS over a socket after NBD_OPT_STARTTLS, or an in-memory
/// stream in tests. Server and client both use it. One reader and one writer may use it at the same time; neither
/// call is made concurrently with itself.
/// </summary>
/// <remarks>
/// Whether the calls block the calling thread or complete asynchronously is the transport's own choice (see
/// <see cref="SocketTransport"/>): connection code always awaits, runs itself through <see cref="RunAsync"/> and
/// waits through <see cref="ReaderWaitAsync"/>, and works the same over either.
/// </remarks>
public abstract class Transport : IAsyncDisposable
{
    /// <summary>Who is at the other end, for logs and messages ("127.0.0.1:10809", "unix", "unix:/run/nbd.sock").</summary>
    public abstract string RemoteDescription { get; }

    /// <summary>The peer's IP endpoint, or null when it has none (Unix socket, in-memory).</summary>
    public virtual IPEndPoint? RemoteIPEndPoint => null;

    /// <summary>
    /// True when the calls are real blocking system calls made on the caller's thread (a socket served by a thread of
    /// its own). Only transports look at it: one layered over another (TLS) blocks when the one below does.
    /// </summary>
    internal virtual bool IsBlocking => false;

    /// <summary>Reads up to <paramref name="buffer"/>.Length bytes; 0 means the peer closed its side.</summary>
    public abstract ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken);

    /// <summary>Sends all of <paramref name="buffer"/>.</summary>
    public abstract ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken);

    /// <summary>
    /// Sends all of <paramref name="buffers"/>, in one system call where the transport can gather. A blocking transport
    /// never holds its caller up for a slow peer here: what the socket cannot take at once is finished by a pool
    /// thread, and the returned task completes then. The list must stay unchanged until the task completes.
    /// </summary>
    public abstract ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken);

    /// <summary>Makes a pending and every later receive return end of stream, while sending keeps working.</summary>
    public virtual void CancelReceive()
    {
    }

    /// <summary>Closes the sending direction once everything sent is out (the peer sees a clean end of stream).</summary>
    public virtual ValueTask ShutdownSendAsync() => ValueTask.CompletedTask;

    /// <summary>Closes the connection at once, failing any pending receive or send.</summary>
    public abstract void Abort();

    public abstract ValueTask DisposeAsync();

    /// <summary>
    /// Runs a connection over this transport from start to end. Asynchronous transports run it on the thread pool; a
    /// blocking socket gives it a thread of its own, so its blocking receives never hold up the pool.
    /// </summary>
    public virtual Task RunAsync(Func<Task> connection, string name)
    {
        ArgumentNullException.ThrowIfNull(connection);
        return Task.Run(connection);
    }

    /// <summary>
    /// How a connection's reader waits for something it cannot go on without (room in its in-flight budget, the last
    /// replies before it closes). Asynchronous transports await it; a blocking one blocks the thread it owns, so the
    /// reader does not move to the pool and then make blocking receives there.
    /// </summary>
    public virtual ValueTask ReaderWaitAsync(ValueTask pending) => pending;

    /// <summary>The plain byte stream under this transport, for TLS to run over (see <see cref="TlsTransport"/>).</summary>
    protected internal abstract Stream OpenStream();

    /// <summary>Runs a connection on a thread of its own (for blocking transports' <see cref="RunAsync"/>).</summary>
    protected static Task RunOnDedicatedThread(Func<Task> connection, string name)
    {
        ArgumentNullException.ThrowIfNull(connection);
        var completion = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        // A small stack: a connection's thread only parses and dispatches, and there may be a thousand of them.
        var thread = new Thread(
            () =>
            {
                try
                {
                    connection().GetAwaiter().GetResult();
                    completion.SetResult();
                }
                catch (Exception exception)
                {
                    completion.SetException(exception);
                }
            },
            maxStackSize: 256 * 1024)
        {
            IsBackground = true,
            Name = name,
        };
        thread.Start();
        return completion.Task;
    }

    /// <summary>Blocks the calling thread until <paramref name="pending"/> is done (for blocking transports' <see cref="ReaderWaitAsync"/>).</summary>
    protected static ValueTask BlockOn(ValueTask pending)
    {
        if (pending.IsCompleted)
        {
            pending.GetAwaiter().GetResult();
        }
        else
        {
            pending.AsTask().GetAwaiter().GetResult();
        }

        return ValueTask.CompletedTask;
    }
}
