namespace Spindle.Fuse;

/// <summary>
/// The buffers requests are read into and replies written from: fixed-size pinned arrays (one read() must take the
/// largest WRITE whole), at most <c>capacity</c> of them outstanding, so memory stays bounded whatever the kernel
/// sends. A request keeps its buffer until its reply is written, and the reply is built in the same buffer.
/// </summary>
internal sealed class RequestBufferPool : IDisposable
{
    private readonly Stack<byte[]> _free = new();
    private readonly Lock _lock = new();
    private readonly SemaphoreSlim _outstanding;
    private readonly int _retain;

    public RequestBufferPool(int bufferSize, int capacity, int retain)
    {
        BufferSize = bufferSize;
        _outstanding = new SemaphoreSlim(capacity, capacity);
        _retain = retain;
    }

    public int BufferSize { get; }

    /// <summary>
    /// Rents a buffer, waiting while <c>capacity</c> are out (requests in flight). Waits in slices of at most a
    /// second and gives up (null) once <paramref name="stop"/> says so.
    /// </summary>
    public byte[]? Rent(Func<bool> stop)
    {
        while (!_outstanding.Wait(TimeSpan.FromSeconds(1)))
        {
            if (stop())
            {
                return null;
            }
        }

        lock (_lock)
        {
            if (_free.TryPop(out var buffer))
            {
                return buffer;
            }
        }

        return GC.AllocateUninitializedArray<byte>(BufferSize, pinned: true);
    }

    public void Return(byte[] buffer)
    {
        lock (_lock)
        {
            if (_free.Count < _retain)
            {
                _free.Push(buffer);
            }
        }

        _outstanding.Release();
    }

    public void Dispose() => _outstanding.Dispose();
}
