using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Storage.Qcow2;

/// <summary>
/// A qcow2 image (versions 2 and 3, qemu's docs/interop/qcow2.txt) served as a block device: reads through the
/// backing chain, copy-on-write allocation with crash-safe metadata ordering, zero clusters, subclusters (extended L2
/// entries), compressed clusters (read), internal snapshots (read-only) and persistent dirty bitmaps.
/// </summary>
/// <remarks>
/// One instance owns the image's metadata and serves every connection (multi-conn). A metadata lock guards the
/// L1/L2/refcount state and caches; reads and writes of clusters that are already allocated do their data I/O outside
/// it. Metadata is written back in dependency order on FLUSH, FUA and cache eviction (see docs/qcow2.md).
/// </remarks>
public sealed partial class Qcow2Image : BlockDevice, IChainLayer
{
    private const ulong OffsetMask = 0x00FF_FFFF_FFFF_FE00; // bits 9-55 of L1, L2 and bitmap table entries
    private const ulong CopiedFlag = 1UL << 63;
    private const ulong CompressedFlag = 1UL << 62;
    private const ulong ZeroFlag = 1UL;
    private const long MaximumL1Bytes = 32L * 1024 * 1024; // qemu's QCOW_MAX_L1_SIZE
    private const long MaximumReftableBytes = 8L * 1024 * 1024; // qemu's QCOW_MAX_REFTABLE_SIZE

    private readonly ImageFile _file;
    private readonly Qcow2Header _header;
    private readonly bool _readOnly;
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly long _clusterMask;
    private readonly bool _extended;
    private readonly int _l2Bits;
    private readonly int _subclusterBits;
    private readonly ulong[] _l1;
    private readonly long _l1Offset;
    private readonly Lock _meta = new();
    private readonly TableCache<ulong[]> _l2Cache;
    private readonly InFlightGate _gate = new();
    private readonly IReadOnlyList<Qcow2SnapshotInfo> _snapshots;
    private readonly long _snapshotTableLength;
    private IChainLayer? _backing;
    private volatile bool _corrupt;
    private bool _disposed;

    private Qcow2Image(ImageFile file, Qcow2Header header, Qcow2OpenOptions options, bool readOnly, string? snapshotName)
    {
        _file = file;
        _header = header;
        _readOnly = readOnly;
        _clusterBits = header.ClusterBits;
        _clusterSize = header.ClusterSize;
        _clusterMask = _clusterSize - 1;
        _extended = (header.IncompatibleFeatures & Qcow2Header.IncompatibleExtendedL2) != 0;
        _l2Bits = _clusterBits - (_extended ? 4 : 3);
        _subclusterBits = _extended ? _clusterBits - 5 : _clusterBits;
        _corrupt = (header.IncompatibleFeatures & Qcow2Header.IncompatibleCorrupt) != 0;

        var size = (long)header.Size;
        var l1Offset = (long)Math.Min(header.L1TableOffset, long.MaxValue);
        var l1Size = header.L1Size;
        _snapshots = Qcow2Snapshots.Read(file, header, size, out var snapshotTableLength);
        _snapshotTableLength = snapshotTableLength;
        if (snapshotName is not null)
        {
            var snapshot = Qcow2Snapshots.Find(_snapshots, snapshotName) ?? throw new Qcow2FormatException(
                $"{file.Path} has no snapshot with id or name '{snapshotName}' (snapshots: {string.Join(", ", _snapshots.Select(s => $"{s.Id} '{s.Name}'"))})");
            if (snapshot.L1TableOffset < 0 || snapshot.L1Size < 0)
            {
                throw new Qcow2FormatException($"snapshot '{snapshotName}' has an invalid L1 table");
            }

            size = snapshot.VirtualSize;
            l1Offset = snapshot.L1TableOffset;
            l1Size = (uint)snapshot.L1Size;
            ActiveSnapshot = snapshot;
        }

        Size = size;
        var bytesPerL1Entry = (long)_clusterSize << _l2Bits;
        var needed = (size + bytesPerL1Entry - 1) / bytesPerL1Entry;
        if (l1Size < needed)
        {
            throw new Qcow2FormatException($"the L1 table ({l1Size} entries) is too small for the virtual size {size} (needs {needed})");
        }

        CheckTable(l1Offset, (long)l1Size * 8, MaximumL1Bytes, "L1 table");
        _l1Offset = snapshotName is null ? l1Offset : -1;
        _l1 = ReadTable(l1Offset, (int)l1Size);
        foreach (var entry in _l1)
        {
            // qcow2.txt "L1 table entry": bits 9-55 must be a cluster-aligned offset.
            if (((entry & OffsetMask) & (ulong)_clusterMask) != 0)
            {
                throw new Qcow2FormatException($"the L1 table holds a misaligned L2 table offset 0x{entry & OffsetMask:x}");
            }
        }

        var l2Capacity = (int)Math.Clamp(options.L2CacheBytes / _clusterSize, 16, 1 << 20);
        _l2Cache = new TableCache<ulong[]>(l2Capacity, EvictL2);

        CheckTable((long)Math.Min(header.RefcountTableOffset, long.MaxValue), (long)header.RefcountTableClusters * _clusterSize, MaximumReftableBytes, "refcount table");
        if (header.RefcountTableClusters == 0)
        {
            throw new Qcow2FormatException("the refcount table has no clusters");
        }

        CheckOverlaps(l1Offset, (long)l1Size * 8, snapshotTableLength);
        InitializeRefcounts(options);
        _metaContexts.Add(new AllocationDepthContext(this));
        if (snapshotName is null)
        {
            LoadBitmaps();
        }
    }

    /// <summary>The virtual disk size in bytes (the snapshot's when one is opened).</summary>
    public override long Size { get; }

    /// <summary>2 or 3.</summary>
    public int Version => _header.Version;

    public int ClusterSize => _clusterSize;

    public int RefcountBits => 1 << _header.RefcountOrder;

    /// <summary>Extended L2 entries: 32 subclusters per cluster, allocated separately.</summary>
    public bool HasSubclusters => _extended;

    /// <summary>"zlib" or "zstd": how compressed clusters are compressed.</summary>
    public string CompressionType => _header.CompressionType == Qcow2Compression.Zstd ? "zstd" : "zlib";

    /// <summary>The backing file name as the header stores it (relative names are relative to this image's directory).</summary>
    public string? BackingFile => _header.BackingFile;

    /// <summary>The backing format from the header extension, or null when the format is probed.</summary>
    public string? BackingFormat => _header.BackingFormat;

    public bool HasLazyRefcounts => (_header.CompatibleFeatures & Qcow2Header.CompatibleLazyRefcounts) != 0;

    /// <summary>The corrupt bit is set (or this instance found corruption): writes are refused.</summary>
    public bool IsCorrupt => _corrupt;

    public bool IsReadOnly => _readOnly;

    public string Path => _file.Path;

    public IReadOnlyList<Qcow2SnapshotInfo> Snapshots => _snapshots;

    /// <summary>The snapshot this instance exposes, or null for the active image.</summary>
    public Qcow2SnapshotInfo? ActiveSnapshot { get; }

    public override string Description => ActiveSnapshot is null ? $"qcow2 {_file.Path}" : $"qcow2 {_file.Path} snapshot '{ActiveSnapshot.Name}'";

    public override BlockDeviceFeatures Features
    {
        get
        {
            var features = BlockDeviceFeatures.Flush | BlockDeviceFeatures.Extents | BlockDeviceFeatures.SharedCache;
            if (!_readOnly)
            {
                features |= BlockDeviceFeatures.Write | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
                            BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero;
            }

            return features;
        }
    }

    public override IReadOnlyList<MetaContextSource> MetaContexts => _metaContexts;

    /// <summary>Whether <paramref name="header"/> (the first bytes of a file) starts with the qcow2 magic "QFI\xfb".</summary>
    public static bool IsQcow2(ReadOnlySpan<byte> header) =>
        header.Length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(header) == Qcow2Header.Magic;

    /// <summary>Whether the file at <paramref name="path"/> starts with the qcow2 magic.</summary>
    public static bool IsQcow2File(string path)
    {
        Span<byte> magic = stackalloc byte[4];
        using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        return RandomAccess.Read(handle, magic, 0) == 4 && IsQcow2(magic);
    }

    /// <summary>
    /// Opens a qcow2 image and its backing chain.
    /// </summary>
    /// <exception cref="Qcow2FormatException">Not qcow2, corrupt, or using a feature this backend refuses.</exception>
    /// <exception cref="FileNotFoundException">The image or a backing file does not exist.</exception>
    public static Qcow2Image Open(string path, Qcow2OpenOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        options ??= new Qcow2OpenOptions();
        if (options.Snapshot is not null && !options.ReadOnly)
        {
            throw new ArgumentException("a snapshot can only be opened read-only (set ReadOnly)", nameof(options));
        }

        return OpenLayer(System.IO.Path.GetFullPath(path), options, options.ReadOnly, options.Snapshot, []);
    }

    private static Qcow2Image OpenLayer(string fullPath, Qcow2OpenOptions options, bool readOnly, string? snapshot, List<string> chain)
    {
        if (!File.Exists(fullPath))
        {
            throw new FileNotFoundException($"'{fullPath}' does not exist", fullPath);
        }

        var file = ImageFile.Open(fullPath, readOnly);
        Qcow2Image? image = null;
        try
        {
            var header = ReadHeader(file);
            CheckSupported(header, file.Path, readOnly, options);
            image = new Qcow2Image(file, header, options, readOnly, snapshot);
            chain.Add(CanonicalPath(fullPath));
            image.OpenBacking(options, chain);
            if (!readOnly)
            {
                image.PrepareForWriting();
            }

            return image;
        }
        catch
        {
            if (image is not null)
            {
                image.ReleaseResources();
            }
            else
            {
                file.Dispose();
            }

            throw;
        }
    }

    private static Qcow2Header ReadHeader(ImageFile file)
    {
        if (file.Length < Qcow2Header.Version2Length)
        {
            throw new Qcow2FormatException($"{file.Path} is too short ({file.Length} bytes) to be a qcow2 image");
        }

        Span<byte> start = stackalloc byte[Qcow2Header.Version3MinimumLength];
        file.Read(start, 0);
        var bits = (int)Math.Clamp(BinaryPrimitives.ReadUInt32BigEndian(start[Qcow2Header.OffsetClusterBits..]), Qcow2Header.MinimumClusterBits, Qcow2Header.MaximumClusterBits);
        var first = new byte[Math.Min(1L << bits, file.Length)];
        file.Read(first, 0);
        if (!Qcow2Header.TryParse(first, out var header, out var error))
        {
            throw new Qcow2FormatException($"{file.Path}: {error}");
        }

        return header;
    }

    /// <summary>Refuses what this backend does not implement, naming it (qcow2.txt "Header", incompatible_features).</summary>
    private static void CheckSupported(Qcow2Header header, string path, bool readOnly, Qcow2OpenOptions options)
    {
        if (header.CryptMethod != 0 || header.HasCryptoHeader)
        {
            var method = header.CryptMethod switch { 1 => "AES", 2 => "LUKS", _ => $"method {header.CryptMethod}" };
            throw new Qcow2FormatException($"{path} is encrypted ({method}); encrypted qcow2 images are not supported (decrypt it with qemu-img convert first)");
        }

        var unknown = header.IncompatibleFeatures & ~Qcow2Header.KnownIncompatible;
        if (unknown != 0)
        {
            throw new Qcow2FormatException($"{path} uses unknown incompatible features ({header.DescribeFeatures(0, unknown)}); it cannot be opened safely");
        }

        if ((header.IncompatibleFeatures & Qcow2Header.IncompatibleExternalData) != 0 || header.ExternalDataFile is not null)
        {
            throw new Qcow2FormatException($"{path} keeps its data in an external data file ('{header.ExternalDataFile}'); external data files are not supported");
        }

        var hasTypeBit = (header.IncompatibleFeatures & Qcow2Header.IncompatibleCompressionType) != 0;
        if (hasTypeBit ? header.CompressionType != Qcow2Compression.Zstd : header.CompressionType != Qcow2Compression.Zlib)
        {
            throw new Qcow2FormatException(hasTypeBit
                ? $"{path} uses compression type {header.CompressionType}; only zlib (0) and zstd (1) exist"
                : $"{path} sets compression type {header.CompressionType} without the compression type feature bit");
        }

        if ((header.IncompatibleFeatures & Qcow2Header.IncompatibleExtendedL2) != 0 && header.ClusterBits < 14)
        {
            throw new Qcow2FormatException($"{path} has extended L2 entries with {header.ClusterSize}-byte clusters (at least 16 KiB are required)");
        }

        if (readOnly)
        {
            return;
        }

        if ((header.IncompatibleFeatures & Qcow2Header.IncompatibleCorrupt) != 0)
        {
            throw new Qcow2FormatException($"{path} is marked corrupt; open it read-only, or repair it with 'qemu-img check -r all'");
        }

        if ((header.IncompatibleFeatures & Qcow2Header.IncompatibleDirty) != 0 && !options.RepairDirtyRefcounts)
        {
            throw new Qcow2FormatException($"{path} is dirty (it was not closed cleanly while using lazy refcounts), so its refcounts may be wrong; " +
                                           "repair it with 'qemu-img check -r all' (or open with RepairDirtyRefcounts), or open it read-only");
        }
    }

    private void CheckTable(long offset, long bytes, long maximum, string what)
    {
        if (bytes == 0)
        {
            return;
        }

        if (bytes > maximum)
        {
            throw new Qcow2FormatException($"the {what} ({bytes} bytes) exceeds qemu's limit of {maximum} bytes");
        }

        if (offset <= 0 || (offset & _clusterMask) != 0 || offset > _file.Length || bytes > _file.Length - offset)
        {
            throw new Qcow2FormatException($"the {what} at offset {offset} ({bytes} bytes) is misaligned or lies outside the file ({_file.Length} bytes)");
        }
    }

    /// <summary>The header cluster, L1 table, refcount table and snapshot table must not share clusters.</summary>
    private void CheckOverlaps(long l1Offset, long l1Bytes, long snapshotBytes)
    {
        var regions = new List<(long Start, long Length, string Name)>
        {
            (0, _clusterSize, "header"),
            (l1Offset, l1Bytes, "L1 table"),
            ((long)_header.RefcountTableOffset, (long)_header.RefcountTableClusters * _clusterSize, "refcount table"),
            ((long)Math.Min(_header.SnapshotsOffset, long.MaxValue), snapshotBytes, "snapshot table"),
        };
        for (var i = 0; i < regions.Count; i++)
        {
            for (var j = i + 1; j < regions.Count; j++)
            {
                var (a, al, an) = regions[i];
                var (b, bl, bn) = regions[j];
                if (al == 0 || bl == 0)
                {
                    continue;
                }

                var aEnd = RoundUp(a + al);
                var bEnd = RoundUp(b + bl);
                if (a < bEnd && b < aEnd)
                {
                    throw new Qcow2FormatException($"the {an} and the {bn} overlap (offsets {a} and {b})");
                }
            }
        }
    }

    private long RoundUp(long value) => (value + _clusterMask) & ~_clusterMask;

    private ulong[] ReadTable(long offset, int entries)
    {
        var table = new ulong[entries];
        if (entries == 0)
        {
            return table;
        }

        var bytes = new byte[entries * 8L];
        _file.Read(bytes, offset);
        for (var i = 0; i < entries; i++)
        {
            table[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * 8));
        }

        return table;
    }

    private static string CanonicalPath(string path)
    {
        try
        {
            var target = new FileInfo(path).ResolveLinkTarget(returnFinalTarget: true);
            return target?.FullName ?? System.IO.Path.GetFullPath(path);
        }
        catch (IOException)
        {
            return System.IO.Path.GetFullPath(path);
        }
    }

    private void EnsureWritable()
    {
        if (_readOnly)
        {
            throw new BlockDeviceException(NbdError.NotPermitted, $"{Description} is read-only");
        }

        if (_corrupt)
        {
            throw new BlockDeviceException(NbdError.IO, $"{Description} is marked corrupt: writes are refused (repair it with 'qemu-img check -r all')");
        }
    }

    protected override async ValueTask DisposeAsyncCore()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        try
        {
            if (!_readOnly && !_corrupt)
            {
                FlushCore();
                lock (_meta)
                {
                    // The decrements the flush applied last are still only in the cache.
                    FlushMetadataLocked();
                }

                CloseBitmaps();
            }
        }
        finally
        {
            await ReleaseResourcesAsync().ConfigureAwait(false);
        }
    }

    private void ReleaseResources() => ReleaseResourcesAsync().AsTask().GetAwaiter().GetResult();

    private async ValueTask ReleaseResourcesAsync()
    {
        _file.Dispose();
        if (_backing is not null)
        {
            await _backing.DisposeAsync().ConfigureAwait(false);
            _backing = null;
        }
    }
}
