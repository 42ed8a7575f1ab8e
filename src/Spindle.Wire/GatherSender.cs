using System.Net.Sockets;
using System.Threading.Tasks.Sources;

namespace Spindle.Wire;

/// <summary>
/// A reusable awaitable gathered send: one <see cref="SocketAsyncEventArgs"/> per transport, so a batch of messages
/// leaves in one sendmsg with no allocation. Continuations run on the pool, never inline on the socket engine's
/// thread (which would then run connection code).
/// </summary>
internal sealed class GatherSender : SocketAsyncEventArgs, IValueTaskSource<int>
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
