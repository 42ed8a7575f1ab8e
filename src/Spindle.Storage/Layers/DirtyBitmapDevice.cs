namespace Spindle.Storage.Layers;

/// <summary>
/// Crash-safe dirty bitmaps over any device (issue 14, <c>spindle serve --bitmap NAME</c>): every WRITE, WRITE_ZEROES
/// and TRIM marks the bits covering its range in each bitmap, and the request reaches the device below only once
/// those bits are on stable storage (<see cref="DirtyBitmap.MarkAsync"/>). So a request is never acknowledged with
/// its bits still volatile, and after kill -9 or a power cut no acknowledged change is missing from the bitmap (an
/// unacknowledged one may be marked too: the bitmap errs towards copying more). A request whose bits are already
/// durable costs a few word reads. Each bitmap is offered as the metadata context <c>qemu:dirty-bitmap:NAME</c>,
/// with qemu's meaning (NBD spec, "Metadata querying"; qemu docs/interop/nbd.txt: status 1 dirty, 0 clean), beside
/// the contexts of the layer below; <c>base:allocation</c> passes through.
/// </summary>
public sealed class DirtyBitmapDevice : LayerDevice
{
    private readonly DirtyBitmap[] _bitmaps;
    private readonly bool _ownsBitmaps;
    private readonly long _size;
    private readonly MetaContextSource[] _contexts;

    /// <param name="inner">The device below.</param>
    /// <param name="bitmaps">The bitmaps, each the size of <paramref name="inner"/>, with names unique among its contexts.</param>
    /// <param name="ownsInner">Dispose <paramref name="inner"/> with this layer.</param>
    /// <param name="ownsBitmaps">Dispose the bitmaps (and release their stores) with this layer.</param>
    /// <exception cref="InvalidDataException">A bitmap describes another size, or its name is taken.</exception>
    public DirtyBitmapDevice(BlockDevice inner, IReadOnlyList<DirtyBitmap> bitmaps, bool ownsInner, bool ownsBitmaps = true)
        : base(inner, ownsInner)
    {
        ArgumentNullException.ThrowIfNull(bitmaps);
        _size = inner.Size;
        _bitmaps = [.. bitmaps];
        _ownsBitmaps = ownsBitmaps;
        var below = inner.MetaContexts;
        var contexts = new List<MetaContextSource>(below);
        foreach (var bitmap in _bitmaps)
        {
            if (bitmap.ImageSize != _size)
            {
                throw new InvalidDataException($"bitmap '{bitmap.Name}' describes {bitmap.ImageSize} bytes and {inner.Description} has {_size}: remove the bitmap (spindle bitmap remove) and take a full backup");
            }

            var context = new BitmapContext(bitmap);
            if (contexts.Any(c => c.Name == context.Name))
            {
                throw new InvalidDataException($"bitmap '{bitmap.Name}': {inner.Description} already offers {context.Name} (a qcow2 bitmap of the same name, or a bitmap given twice); choose another name");
            }

            contexts.Add(context);
        }

        _contexts = [.. contexts];
    }

    /// <summary>The bitmaps of this layer.</summary>
    public IReadOnlyList<DirtyBitmap> Bitmaps => _bitmaps;

    /// <summary>The size when the layer was stacked: the bitmaps cover that much and no more.</summary>
    public override long Size => _size;

    public override string Description => $"{Inner.Description} with dirty bitmap{(_bitmaps.Length == 1 ? string.Empty : "s")} {string.Join(", ", _bitmaps.Select(b => b.Name))}";

    public override IReadOnlyList<MetaContextSource> MetaContexts => _contexts;

    public override bool SubmitsWithoutBlocking => Inner.SubmitsWithoutBlocking;

    public override bool TryReadImmediate(long offset, Span<byte> destination) => Inner.TryReadImmediate(offset, destination);

    public override bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source) =>
        IsDurable(offset, source.Length) && Inner.TryWriteImmediate(offset, source);

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        IsDurable(offset, source.Length)
            ? Inner.WriteAsync(offset, source, fua, cancellationToken)
            : WriteMarkedAsync(offset, source, fua, cancellationToken);

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        IsDurable(offset, length)
            ? Inner.TrimAsync(offset, length, fua, cancellationToken)
            : TrimMarkedAsync(offset, length, fua, cancellationToken);

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        IsDurable(offset, length)
            ? Inner.WriteZeroesAsync(offset, length, flags, cancellationToken)
            : WriteZeroesMarkedAsync(offset, length, flags, cancellationToken);

    protected override BlockDevice ForConnection(BlockDevice connectionInner) =>
        new DirtyBitmapDevice(connectionInner, _bitmaps, ownsInner: true, ownsBitmaps: false);

    protected override async ValueTask DisposeAsyncCore()
    {
        // The bitmaps first: their last commit round may still use the device below (an RBD image's metadata).
        if (_ownsBitmaps)
        {
            foreach (var bitmap in _bitmaps)
            {
                bitmap.Dispose();
            }
        }

        await base.DisposeAsyncCore().ConfigureAwait(false);
    }

    private bool IsDurable(long offset, long length)
    {
        foreach (var bitmap in _bitmaps)
        {
            if (!bitmap.IsDurable(offset, length))
            {
                return false;
            }
        }

        return true;
    }

    /// <summary>Every bitmap's bits durable first (in parallel: each has its own store), then the operation.</summary>
    private async ValueTask MarkAsync(long offset, long length, CancellationToken cancellationToken)
    {
        if (_bitmaps.Length == 1)
        {
            await _bitmaps[0].MarkAsync(offset, length, cancellationToken).ConfigureAwait(false);
            return;
        }

        var marks = new Task[_bitmaps.Length];
        for (var i = 0; i < marks.Length; i++)
        {
            marks[i] = _bitmaps[i].MarkAsync(offset, length, cancellationToken);
        }

        await Task.WhenAll(marks).ConfigureAwait(false);
    }

    private async ValueTask WriteMarkedAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        await MarkAsync(offset, source.Length, cancellationToken).ConfigureAwait(false);
        await Inner.WriteAsync(offset, source, fua, cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask TrimMarkedAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        await MarkAsync(offset, length, cancellationToken).ConfigureAwait(false);
        await Inner.TrimAsync(offset, length, fua, cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask WriteZeroesMarkedAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        await MarkAsync(offset, length, cancellationToken).ConfigureAwait(false);
        await Inner.WriteZeroesAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>qemu:dirty-bitmap:NAME: status 1 where the bitmap is dirty, 0 where clean, in runs of whole granules.</summary>
    private sealed class BitmapContext(DirtyBitmap bitmap) : MetaContextSource
    {
        public override string Name => Spindle.Protocol.MetaContexts.DirtyBitmapPrefix + bitmap.Name;

        public override ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken)
        {
            ArgumentNullException.ThrowIfNull(status);
            var end = offset + length;
            var position = offset;
            var granularity = bitmap.Granularity;
            while (position < end && !status.IsFull)
            {
                var bit = position / granularity;
                var dirty = bitmap.IsDirtyBit(bit);
                var next = bit + 1;
                while (next * granularity < end && bitmap.IsDirtyBit(next) == dirty)
                {
                    next++;
                }

                var runEnd = Math.Min(next * granularity, end);
                status.Add(runEnd - position, dirty ? 1u : 0u);
                position = runEnd;
            }

            return ValueTask.CompletedTask;
        }
    }
}
