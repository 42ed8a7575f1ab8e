using Spindle.Protocol;

namespace Spindle.Storage.Qcow2;

/// <summary>
/// One image of a backing chain as the image above it sees it: a qcow2 image (<see cref="Qcow2Image"/>) or a raw
/// file. Every call is synchronous and thread-safe, and stays within <see cref="Size"/>.
/// </summary>
internal interface IChainLayer : IAsyncDisposable
{
    long Size { get; }

    string Description { get; }

    /// <summary>Reads <paramref name="destination"/> at <paramref name="offset"/> (within the layer).</summary>
    void ReadLayer(long offset, Span<byte> destination);

    /// <summary>
    /// Reads only if it can be done at once (metadata cached, data in the page cache), as
    /// <see cref="BlockDevice.TryReadImmediate"/>; false leaves <paramref name="destination"/> to <see cref="ReadLayer"/>.
    /// </summary>
    bool TryReadLayerImmediate(long offset, Span<byte> destination);

    /// <summary>Appends base:allocation extents for the range, as the whole chain from this layer down reads it.</summary>
    void DescribeLayer(long offset, long length, ExtentList extents);

    /// <summary>
    /// The allocation depth (qemu:allocation-depth) at <paramref name="offset"/>, counting this layer as 1, and how many
    /// bytes from there share it (at most <paramref name="length"/>).
    /// </summary>
    long DepthLayer(long offset, long length, out int depth);
}

/// <summary>A raw file at the bottom of a backing chain: every byte is allocated at this layer, as qemu sees raw files.</summary>
internal sealed class RawLayer : IChainLayer
{
    private readonly FileBlockDevice _device;

    public RawLayer(FileBlockDevice device) => _device = device;

    public long Size => _device.Size;

    public string Description => _device.Description;

    public void ReadLayer(long offset, Span<byte> destination)
    {
        var array = System.Buffers.ArrayPool<byte>.Shared.Rent(destination.Length);
        try
        {
            if (!_device.TryReadImmediate(offset, destination))
            {
                var memory = array.AsMemory(0, destination.Length);
                var pending = _device.ReadAsync(offset, memory, CancellationToken.None);
                if (!pending.IsCompletedSuccessfully)
                {
                    pending.AsTask().GetAwaiter().GetResult();
                }

                memory.Span.CopyTo(destination);
            }
        }
        finally
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(array);
        }
    }

    public bool TryReadLayerImmediate(long offset, Span<byte> destination) => _device.TryReadImmediate(offset, destination);

    public void DescribeLayer(long offset, long length, ExtentList extents)
    {
        // SEEK_DATA / SEEK_HOLE: data, or a hole that reads as zeroes (file-posix's answer in qemu).
        var pending = _device.GetExtentsAsync(offset, length, extents, CancellationToken.None);
        if (!pending.IsCompletedSuccessfully)
        {
            pending.AsTask().GetAwaiter().GetResult();
        }
    }

    public long DepthLayer(long offset, long length, out int depth)
    {
        depth = 1;
        return length;
    }

    public ValueTask DisposeAsync() => _device.DisposeAsync();
}

/// <summary>Status flags of <c>base:allocation</c> for the kinds of qcow2 runs.</summary>
internal static class RunFlags
{
    public const AllocationFlags Data = AllocationFlags.Data;
    public const AllocationFlags Zero = AllocationFlags.Hole | AllocationFlags.Zero;
}
