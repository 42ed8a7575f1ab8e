using System.Threading.Tasks.Sources;

namespace Spindle.Wire;

public sealed partial class SocketTransport
{
    /// <summary>
    /// The rest of a blocking gathered send, finished on a pool thread that may block. Reused: a transport has at most
    /// one gathered send in progress (its caller awaits it before the next).
    /// </summary>
    private sealed class BlockingSend(SocketTransport transport) : IThreadPoolWorkItem, IValueTaskSource
    {
        private ManualResetValueTaskSourceCore<bool> _source = new() { RunContinuationsAsynchronously = false };
        private IList<ArraySegment<byte>>? _buffers;
        private long _sent;
        private long _total;

        public ValueTask Start(IList<ArraySegment<byte>> buffers, long sent, long total)
        {
            _source.Reset();
            _buffers = buffers;
            _sent = sent;
            _total = total;
            ThreadPool.UnsafeQueueUserWorkItem(this, preferLocal: false);
            return new ValueTask(this, _source.Version);
        }

        void IThreadPoolWorkItem.Execute()
        {
            try
            {
                while (_sent < _total)
                {
                    _sent += NativeSocket.Send(transport._socket, _buffers!, _sent, dontWait: false);
                }

                _buffers = null;
                _source.SetResult(true);
            }
            catch (Exception exception)
            {
                _buffers = null;
                _source.SetException(exception);
            }
        }

        public void GetResult(short token) => _source.GetResult(token);

        public ValueTaskSourceStatus GetStatus(short token) => _source.GetStatus(token);

        public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
            _source.OnCompleted(continuation, state, token, flags);
    }
}
