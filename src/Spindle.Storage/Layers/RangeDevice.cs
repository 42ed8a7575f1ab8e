namespace Spindle.Storage.Layers;

/// <summary>
/// A window onto part of the device below (issue 14: <c>--offset/--size</c>, <c>--partition N</c>; nbdkit's offset and
/// partition filters): offset 0 here is <see cref="Offset"/> below, and the size is the window's, so the server's
/// usual range checks (EINVAL for a read past the end, ENOSPC for a write) keep every request inside the window.
/// </summary>
public sealed class RangeDevice : LayerDevice
{
    private readonly long _length;

    /// <param name="inner">The whole device.</param>
    /// <param name="offset">Where the window starts, a multiple of the inner device's minimum block size.</param>
    /// <param name="length">The window's length; it must end within the inner device.</param>
    /// <param name="ownsInner">Dispose the inner device with the window.</param>
    /// <exception cref="ArgumentOutOfRangeException">The window does not fit, or is not aligned to the device's blocks.</exception>
    public RangeDevice(BlockDevice inner, long offset, long length, bool ownsInner)
        : base(inner, ownsInner)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (offset > inner.Size || length > inner.Size - offset)
        {
            throw new ArgumentOutOfRangeException(nameof(length), $"bytes {offset} to {offset + length} do not fit in {inner.Description} ({inner.Size} bytes)");
        }

        var minimum = inner.BlockSizes?.Minimum ?? 1;
        if (offset % minimum != 0 || length % minimum != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"the range must be aligned to the device's {minimum}-byte blocks");
        }

        Offset = offset;
        _length = length;
    }

    /// <summary>Where the window starts on the device below.</summary>
    public long Offset { get; }

    public override long Size => _length;

    public override string Description => $"{Inner.Description}, bytes {Offset} to {Offset + _length}";

    public override bool SubmitsWithoutBlocking => Inner.SubmitsWithoutBlocking;

    public override IReadOnlyList<MetaContextSource> MetaContexts =>
        Inner.MetaContexts is { Count: > 0 } sources ? [.. sources.Select(s => new ShiftedSource(s, Offset))] : [];

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        Inner.ReadAsync(Offset + offset, destination, cancellationToken);

    public override bool TryReadImmediate(long offset, Span<byte> destination) => Inner.TryReadImmediate(Offset + offset, destination);

    public override bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source) => Inner.TryWriteImmediate(Offset + offset, source);

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        Inner.WriteAsync(Offset + offset, source, fua, cancellationToken);

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        Inner.TrimAsync(Offset + offset, length, fua, cancellationToken);

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        Inner.WriteZeroesAsync(Offset + offset, length, flags, cancellationToken);

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken) =>
        Inner.CacheAsync(Offset + offset, length, cancellationToken);

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        Inner.GetExtentsAsync(Offset + offset, length, extents, cancellationToken);

    /// <summary>Another metadata context of the device below, seen through the window.</summary>
    private sealed class ShiftedSource(MetaContextSource inner, long shift) : MetaContextSource
    {
        public override string Name => inner.Name;

        public override ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken) =>
            inner.GetStatusAsync(shift + offset, length, status, cancellationToken);
    }
}
