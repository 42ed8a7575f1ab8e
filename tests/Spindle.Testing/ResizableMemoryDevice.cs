using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Testing;

/// <summary>
/// Memory whose size a test changes while it is served (up to a capacity fixed at creation), as an RBD image resized
/// online changes under its export.
/// </summary>
public sealed class ResizableMemoryDevice(long size, long capacity) : BlockDevice
{
    private readonly byte[] _data = new byte[capacity];
    private long _size = size;

    public override long Size => Volatile.Read(ref _size);

    public override BlockDeviceFeatures Features => BlockDeviceFeatures.Write | BlockDeviceFeatures.Flush | BlockDeviceFeatures.SharedCache;

    public void Resize(long newSize)
    {
        if (newSize < Size)
        {
            _data.AsSpan((int)newSize).Clear();
        }

        Volatile.Write(ref _size, newSize);
    }

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        CheckRange(offset, destination.Length);
        _data.AsMemory((int)offset, destination.Length).CopyTo(destination);
        return ValueTask.CompletedTask;
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        CheckRange(offset, source.Length);
        source.CopyTo(_data.AsMemory((int)offset));
        return ValueTask.CompletedTask;
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    /// <summary>As a backend past its end does (librbd answers -EINVAL), so the server's bound is what is tested.</summary>
    private void CheckRange(long offset, int length)
    {
        if (offset + length > Size)
        {
            throw new BlockDeviceException(NbdError.InvalidArgument, $"{offset}+{length} is past the end ({Size} bytes)");
        }
    }
}
