namespace Spindle.Storage.Qcow2;

/// <summary>What <see cref="Qcow2Image.Create"/> makes: the fields <c>qemu-img create -f qcow2</c> takes.</summary>
public sealed class Qcow2CreateOptions
{
    /// <summary>The most bytes a backing file name may have (qemu's limit: 1023, so it fits the header cluster).</summary>
    public const int MaximumBackingFileBytes = 1023;

    /// <summary>
    /// The virtual size in bytes, rounded up to a multiple of 512 as qemu-img does. Default: null, the backing file's
    /// virtual size (its length for a raw file or block device, its header's size for a qcow2 image); required when
    /// there is no backing file.
    /// </summary>
    public long? Size { get; init; }

    /// <summary>
    /// The backing file name exactly as the header will store it (<c>-b</c>): a relative name is relative to the new
    /// image's directory, not to the current directory, as qemu resolves it. Default: null, no backing file.
    /// </summary>
    public string? BackingFile { get; init; }

    /// <summary>
    /// "raw" or "qcow2" (<c>-F</c>), written to the backing format header extension so nobody has to probe the
    /// backing file (probing a raw file whose first bytes happen to look like qcow2 is a known hazard). Default: null,
    /// detected from the backing file's first bytes.
    /// </summary>
    public string? BackingFormat { get; init; }

    /// <summary>The cluster size, a power of two from 512 bytes to 2 MiB. Default: 64 KiB, qemu's default.</summary>
    public int ClusterSize { get; init; } = 64 * 1024;
}
