using Spindle.Protocol;

namespace Spindle.Storage.Layers;

/// <summary>
/// A device that wraps another (issue 14): a copy-on-write overlay, a window onto a partition, a filter. Every
/// operation passes straight through to <see cref="Inner"/> until a layer overrides it, so a layer only writes down
/// what it changes, and what it advertises (features, block sizes, queue depth, metadata contexts) follows the layer
/// below unless it has reason to differ. An export without layers never sees this class.
/// </summary>
public abstract class LayerDevice : BlockDevice
{
    private readonly bool _ownsInner;

    /// <param name="inner">The device below.</param>
    /// <param name="ownsInner">Dispose <paramref name="inner"/> with this layer (false when several layers share it).</param>
    protected LayerDevice(BlockDevice inner, bool ownsInner)
    {
        ArgumentNullException.ThrowIfNull(inner);
        Inner = inner;
        _ownsInner = ownsInner;
    }

    /// <summary>The device below this layer.</summary>
    public BlockDevice Inner { get; }

    /// <summary>The bottom of the stack: the backend itself (for identity, such as the file an export's UUID is kept with).</summary>
    public BlockDevice Backend => Inner is LayerDevice layer ? layer.Backend : Inner;

    public override long Size => Inner.Size;

    public override BlockDeviceFeatures Features => Inner.Features;

    public override BlockSizeConstraints? BlockSizes => Inner.BlockSizes;

    public override int? QueueDepth => Inner.QueueDepth;

    public override int? MaxConcurrentWrites => Inner.MaxConcurrentWrites;

    public override string Description => Inner.Description;

    public override IReadOnlyList<MetaContextSource> MetaContexts => Inner.MetaContexts;

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        Inner.ReadAsync(offset, destination, cancellationToken);

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        Inner.WriteAsync(offset, source, fua, cancellationToken);

    public override ValueTask FlushAsync(CancellationToken cancellationToken) => Inner.FlushAsync(cancellationToken);

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        Inner.TrimAsync(offset, length, fua, cancellationToken);

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        Inner.WriteZeroesAsync(offset, length, flags, cancellationToken);

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken) =>
        Inner.CacheAsync(offset, length, cancellationToken);

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        Inner.GetExtentsAsync(offset, length, extents, cancellationToken);

    /// <summary>
    /// Passes a per-connection device from below up through this layer: when the layer below gives a connection its
    /// own device (nbd-server's <c>copyonwrite</c>), this layer wraps it with <see cref="ForConnection"/>.
    /// </summary>
    public override async ValueTask<BlockDevice> OpenConnectionAsync(CancellationToken cancellationToken)
    {
        var inner = await Inner.OpenConnectionAsync(cancellationToken).ConfigureAwait(false);
        return ReferenceEquals(inner, Inner) ? this : ForConnection(inner);
    }

    /// <summary>
    /// This layer over one connection's own device below, sharing this layer's state (a rate limit stays per export);
    /// the result owns <paramref name="connectionInner"/>. Layers that never sit above a per-connection layer keep the
    /// default, which refuses.
    /// </summary>
    protected virtual BlockDevice ForConnection(BlockDevice connectionInner) =>
        throw new NotSupportedException($"{GetType().Name} cannot sit above a per-connection layer");

    protected override async ValueTask DisposeAsyncCore()
    {
        if (_ownsInner)
        {
            await Inner.DisposeAsync().ConfigureAwait(false);
        }
    }
}
