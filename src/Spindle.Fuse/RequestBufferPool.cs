using Spindle.Wire;

namespace Spindle.Fuse;

/// <summary>
/// The buffers requests are read into and replies written from: pinned arrays from the shared
/// <see cref="BufferPool"/> large enough for the largest WRITE (one read() must take it whole), at most
/// <c>capacity</c> of them outstanding, so memory stays bounded whatever the kernel sends. A request keeps its buffer
/// until its reply is written, and the reply is built in the same buffer.
/// </summary>
internal sealed class RequestBufferPool : IDisposable
{
    private readonly SemaphoreSlim _outstanding;

    public RequestBufferPool(int bufferSize, int capacity)
    {
        BufferSize = bufferSize;
        _outstanding = new SemaphoreSlim(capacity, capacity);
    }

    /// <summary>The least a rented buffer holds (the pool's size classes may give more).</summary>
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

        return BufferPool.Shared.Rent(BufferSize);
    }

    public void Return(byte[] buffer)
    {
        BufferPool.Shared.Return(buffer);
        _outstanding.Release();
    }

    public void Dispose() => _outstanding.Dispose();
}
