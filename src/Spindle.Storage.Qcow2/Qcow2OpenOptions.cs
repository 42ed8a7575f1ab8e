namespace Spindle.Storage.Qcow2;

/// <summary>How <see cref="Qcow2Image.Open"/> opens an image.</summary>
public sealed class Qcow2OpenOptions
{
    /// <summary>Open without write access. Default: false (read-write).</summary>
    /// <remarks>
    /// Images with the corrupt bit, or left dirty by a crash with lazy refcounts, can only be opened read-only, as
    /// with qemu. Backing files are always opened read-only.
    /// </remarks>
    public bool ReadOnly { get; init; }

    /// <summary>
    /// Rebuild the refcounts of an image left dirty by a crash with lazy refcounts when it is opened for writing, as
    /// qemu does (a new refcount structure is written, then switched to, then the dirty bit is cleared). Default:
    /// true. When false such an image is refused for writing with a message naming <c>qemu-img check -r all</c>.
    /// </summary>
    public bool RepairDirtyRefcounts { get; init; } = true;

    /// <summary>
    /// An internal snapshot to expose instead of the active image, by id or (when no id matches) by name, as
    /// <c>qemu-img convert -l</c> looks it up. Requires <see cref="ReadOnly"/>. Default: null (the active image).
    /// </summary>
    public string? Snapshot { get; init; }

    /// <summary>
    /// The most memory the L2 table cache may hold. Default: 32 MiB, qemu's default maximum on Linux, which maps
    /// 256 GiB of a 64 KiB-cluster image. At least 16 tables are always cached.
    /// </summary>
    public long L2CacheBytes { get; init; } = 32L * 1024 * 1024;

    /// <summary>
    /// The most memory the refcount block cache may hold. Default: 4 MiB (one refcount block of a 64 KiB-cluster
    /// image with 16-bit refcounts describes 2 GiB). At least 16 blocks are always cached.
    /// </summary>
    public long RefcountCacheBytes { get; init; } = 4L * 1024 * 1024;

    /// <summary>
    /// The longest backing chain followed (this image not counted). Default: 32; a longer chain is refused as
    /// corrupt, which also catches loops that path comparison cannot (hard links, bind mounts).
    /// </summary>
    public int MaxBackingDepth { get; init; } = 32;

    /// <summary>
    /// Open the backing chain. Default: true. When false, unallocated clusters of an image with a backing file
    /// read as zeroes (qemu's <c>-o backing.driver=null-co</c> view); only useful for inspection.
    /// </summary>
    public bool OpenBackingChain { get; init; } = true;
}
