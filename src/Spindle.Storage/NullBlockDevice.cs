using Spindle.Protocol;

namespace Spindle.Storage;

/// <summary>
/// A device of any size that stores nothing: reads return zeroes, writes, zeroes and trims are accepted and
/// discarded, flush does nothing, and the whole range is one hole that reads as zeroes. It is <c>spindle copy</c>'s
/// <c>null:</c> (a sink to measure how fast a source reads, like nbdcopy's <c>null:</c>, or a source of zeroes) and
/// the upper bound of a benchmark (like nbdkit's null plugin): every operation completes at once, on the caller's
/// thread, without allocating.
/// </summary>
public sealed class NullBlockDevice : BlockDevice
{
    /// <summary>Everything a device can declare except <see cref="BlockDeviceFeatures.Rotational"/>.</summary>
    private const BlockDeviceFeatures AllFeatures =
        BlockDeviceFeatures.Write | BlockDeviceFeatures.Flush | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
        BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero | BlockDeviceFeatures.Cache |
        BlockDeviceFeatures.Extents | BlockDeviceFeatures.SharedCache;

    /// <summary>A null device of <paramref name="size"/> bytes.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The size is negative.</exception>
    public NullBlockDevice(long size)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        Size = size;
    }

    public override long Size { get; }

    public override BlockDeviceFeatures Features => AllFeatures;

    public override string Description => $"null device ({Size} bytes)";

    /// <summary>Nothing here ever blocks, so the server need not hop to the thread pool.</summary>
    public override bool SubmitsWithoutBlocking => true;

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        destination.Span.Clear();
        return ValueTask.CompletedTask;
    }

    public override bool TryReadImmediate(long offset, Span<byte> destination)
    {
        destination.Clear();
        return true;
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        ValueTask.CompletedTask;

    public override bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source) => true;

    public override ValueTask FlushAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    /// <summary>Always cheap, so <see cref="ZeroFlags.FastOnly"/> never fails here.</summary>
    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        ValueTask.CompletedTask;

    /// <summary>One extent for the whole range: a hole that reads as zeroes (NBD_STATE_HOLE | NBD_STATE_ZERO).</summary>
    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        extents.Add(length, AllocationFlags.Hole | AllocationFlags.Zero);
        return ValueTask.CompletedTask;
    }
}
