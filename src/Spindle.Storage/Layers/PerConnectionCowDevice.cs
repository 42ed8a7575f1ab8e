using Spindle.Protocol;

namespace Spindle.Storage.Layers;

/// <summary>
/// nbd-server's <c>copyonwrite = true</c>: every client connection gets its own <see cref="CowOverlayDevice"/> over the
/// shared, read-only base, and its writes are thrown away when it disconnects. This device is what the export
/// advertises (a writable device without multi-conn, since connections do not see each other's writes); the server
/// asks it for each connection's overlay through <see cref="OpenConnectionAsync"/>.
/// </summary>
public sealed class PerConnectionCowDevice : LayerDevice
{
    private readonly string? _directory;

    /// <param name="baseDevice">The shared base, only ever read.</param>
    /// <param name="directory">Where each connection's overlay file goes; null: $TMPDIR.</param>
    /// <param name="ownsBase">Dispose the base with this device.</param>
    public PerConnectionCowDevice(BlockDevice baseDevice, string? directory, bool ownsBase)
        : base(baseDevice, ownsBase)
    {
        _directory = directory;
    }

    /// <summary>What each connection's overlay supports; never <see cref="BlockDeviceFeatures.SharedCache"/>.</summary>
    public override BlockDeviceFeatures Features =>
        BlockDeviceFeatures.Write | BlockDeviceFeatures.Flush | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
        BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero | BlockDeviceFeatures.Cache | BlockDeviceFeatures.Extents |
        (Inner.Features & BlockDeviceFeatures.Rotational);

    public override string Description => $"per-connection copy-on-write overlays on {Inner.Description}";

    public override IReadOnlyList<MetaContextSource> MetaContexts => [];

    /// <summary>A fresh overlay for one connection; the server disposes it (and so its file) when the connection ends.</summary>
    public override ValueTask<BlockDevice> OpenConnectionAsync(CancellationToken cancellationToken)
    {
        cancellationToken.ThrowIfCancellationRequested();
        return ValueTask.FromResult<BlockDevice>(new CowOverlayDevice(Inner, _directory, ownsBase: false, shared: false));
    }

    // Only a connection's own overlay is ever written. These guard the base if anything reached this device directly.
    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        throw NotHere();

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) => throw NotHere();

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        throw NotHere();

    /// <summary>The server flushes every export when it stops; there is nothing shared to flush.</summary>
    public override ValueTask FlushAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    private static BlockDeviceException NotHere() =>
        new(NbdError.IO, "writes go to a connection's own overlay, not to the shared base");
}
