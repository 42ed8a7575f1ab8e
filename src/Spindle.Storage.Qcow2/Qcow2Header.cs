using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
using System.Text;

namespace Spindle.Storage.Qcow2;

/// <summary>One entry of the feature name table header extension (qcow2.txt "Feature name table").</summary>
public readonly record struct Qcow2FeatureName(int Type, int Bit, string Name);

/// <summary>
/// The qcow2 header and its header extensions (qcow2.txt "Header", "Header extensions"), parsed from the first
/// cluster of the image. Every field is checked against the spec's limits here; cross-checks against the file size
/// are done by the opener.
/// </summary>
internal sealed class Qcow2Header
{
    public const uint Magic = 0x514649FB; // "QFI\xfb"
    public const int Version2Length = 72;
    public const int Version3MinimumLength = 104;
    public const int MinimumClusterBits = 9;
    public const int MaximumClusterBits = 21; // qemu's 2 MiB implementation limit

    // Field offsets (qcow2.txt "Header").
    public const int OffsetVersion = 4;
    public const int OffsetBackingFileOffset = 8;
    public const int OffsetBackingFileSize = 16;
    public const int OffsetClusterBits = 20;
    public const int OffsetSize = 24;
    public const int OffsetCryptMethod = 32;
    public const int OffsetL1Size = 36;
    public const int OffsetL1TableOffset = 40;
    public const int OffsetRefcountTableOffset = 48;
    public const int OffsetRefcountTableClusters = 56;
    public const int OffsetSnapshotCount = 60;
    public const int OffsetSnapshotsOffset = 64;
    public const int OffsetIncompatibleFeatures = 72;
    public const int OffsetCompatibleFeatures = 80;
    public const int OffsetAutoclearFeatures = 88;
    public const int OffsetRefcountOrder = 96;
    public const int OffsetHeaderLength = 100;
    public const int OffsetCompressionType = 104;

    // Incompatible feature bits.
    public const ulong IncompatibleDirty = 1UL << 0;
    public const ulong IncompatibleCorrupt = 1UL << 1;
    public const ulong IncompatibleExternalData = 1UL << 2;
    public const ulong IncompatibleCompressionType = 1UL << 3;
    public const ulong IncompatibleExtendedL2 = 1UL << 4;
    public const ulong KnownIncompatible = (1UL << 5) - 1;

    public const ulong CompatibleLazyRefcounts = 1UL << 0;

    public const ulong AutoclearBitmaps = 1UL << 0;
    public const ulong AutoclearRawExternalData = 1UL << 1;

    // Header extension types (qcow2.txt "Header extensions").
    public const uint ExtensionEnd = 0x00000000;
    public const uint ExtensionBackingFormat = 0xE2792ACA;
    public const uint ExtensionFeatureNames = 0x6803F857;
    public const uint ExtensionBitmaps = 0x23852875;
    public const uint ExtensionCryptoHeader = 0x0537BE77;
    public const uint ExtensionExternalDataFile = 0x44415441;

    public int Version { get; private init; }
    public ulong BackingFileOffset { get; private init; }
    public uint BackingFileSize { get; private init; }
    public int ClusterBits { get; private init; }
    public ulong Size { get; private init; }
    public uint CryptMethod { get; private init; }
    public uint L1Size { get; private init; }
    public ulong L1TableOffset { get; private init; }
    public ulong RefcountTableOffset { get; private init; }
    public uint RefcountTableClusters { get; private init; }
    public uint SnapshotCount { get; private init; }
    public ulong SnapshotsOffset { get; private init; }
    public ulong IncompatibleFeatures { get; private init; }
    public ulong CompatibleFeatures { get; private init; }
    public ulong AutoclearFeatures { get; private init; }
    public int RefcountOrder { get; private init; }
    public int HeaderLength { get; private init; }
    public byte CompressionType { get; private init; }

    public string? BackingFile { get; private set; }
    public string? BackingFormat { get; private set; }
    public IReadOnlyList<Qcow2FeatureName> FeatureNames { get; private set; } = [];
    public string? ExternalDataFile { get; private set; }
    public bool HasCryptoHeader { get; private set; }

    /// <summary>The bitmaps extension: (count, directory size, directory offset), or null when absent.</summary>
    public (uint Count, ulong DirectorySize, ulong DirectoryOffset)? Bitmaps { get; private set; }

    public int ClusterSize => 1 << ClusterBits;

    /// <summary>
    /// Parses the header at the start of <paramref name="data"/> (the first cluster of the file, or as much of it as
    /// the file holds). Returns false with a reason for anything the spec forbids.
    /// </summary>
    /// <remarks>
    /// <code>
    ///  0       4         8                   16        20           24      32      36      40
    /// +-------+---------+-------------------+---------+------------+-------+-------+-------+----------------+
    /// | magic | version | backing_file_off  | bf_size | cluster_bits| size  | crypt | l1_sz | l1_table_off   |
    /// +-------+---------+-------------------+---------+------------+-------+-------+-------+----------------+
    ///  48                 56          60           64                72 (end of v2)
    /// +------------------+-----------+------------+-----------------+
    /// | refcount_tbl_off | rt_clust. | nb_snaps   | snapshots_off   |
    /// +------------------+-----------+------------+-----------------+
    ///  72              80             88            96              100           104 (v3 minimum)  105
    /// +---------------+--------------+-------------+---------------+-------------+-----------------+
    /// | incompatible  | compatible   | autoclear   | refcount_order| header_len  | compression_type|
    /// +---------------+--------------+-------------+---------------+-------------+-----------------+
    /// then header extensions: { u32 type, u32 length, data, padding to 8 } until type 0, within the first cluster.
    /// </code>
    /// </remarks>
    public static bool TryParse(ReadOnlySpan<byte> data, [NotNullWhen(true)] out Qcow2Header? header, [NotNullWhen(false)] out string? error)
    {
        header = null;
        if (data.Length < Version2Length || BinaryPrimitives.ReadUInt32BigEndian(data) != Magic)
        {
            error = "not a qcow2 image (no QFI\\xfb magic)";
            return false;
        }

        var version = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetVersion..]);
        if (version is not 2 and not 3)
        {
            error = version == 1
                ? "qcow version 1 images are not supported (convert with qemu-img convert -O qcow2)"
                : $"unsupported qcow2 version {version} (only 2 and 3 exist)";
            return false;
        }

        var clusterBits = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetClusterBits..]);
        if (clusterBits is < MinimumClusterBits or > MaximumClusterBits)
        {
            error = $"cluster_bits {clusterBits} is outside 9..21 (512 B to 2 MiB clusters)";
            return false;
        }

        var clusterSize = 1 << (int)clusterBits;
        var headerLength = Version2Length;
        ulong incompatible = 0, compatible = 0, autoclear = 0;
        var refcountOrder = 4;
        byte compressionType = 0;
        if (version >= 3)
        {
            if (data.Length < Version3MinimumLength)
            {
                error = "truncated version 3 header";
                return false;
            }

            headerLength = (int)Math.Min(BinaryPrimitives.ReadUInt32BigEndian(data[OffsetHeaderLength..]), int.MaxValue);
            if (headerLength < Version3MinimumLength || headerLength % 8 != 0 || headerLength > clusterSize || headerLength > data.Length)
            {
                error = $"invalid header_length {headerLength} (at least 104, a multiple of 8, within the first cluster)";
                return false;
            }

            incompatible = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetIncompatibleFeatures..]);
            compatible = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetCompatibleFeatures..]);
            autoclear = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetAutoclearFeatures..]);
            var order = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetRefcountOrder..]);
            if (order > 6)
            {
                error = $"refcount_order {order} exceeds 6 (64-bit refcounts)";
                return false;
            }

            refcountOrder = (int)order;
            if (headerLength > OffsetCompressionType)
            {
                compressionType = data[OffsetCompressionType];
            }
        }

        var backingOffset = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetBackingFileOffset..]);
        var backingSize = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetBackingFileSize..]);
        var parsed = new Qcow2Header
        {
            Version = (int)version,
            BackingFileOffset = backingOffset,
            BackingFileSize = backingSize,
            ClusterBits = (int)clusterBits,
            Size = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetSize..]),
            CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetCryptMethod..]),
            L1Size = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetL1Size..]),
            L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetL1TableOffset..]),
            RefcountTableOffset = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetRefcountTableOffset..]),
            RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetRefcountTableClusters..]),
            SnapshotCount = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetSnapshotCount..]),
            SnapshotsOffset = BinaryPrimitives.ReadUInt64BigEndian(data[OffsetSnapshotsOffset..]),
            IncompatibleFeatures = incompatible,
            CompatibleFeatures = compatible,
            AutoclearFeatures = autoclear,
            RefcountOrder = refcountOrder,
            HeaderLength = headerLength,
            CompressionType = compressionType,
        };

        if (parsed.Size > long.MaxValue)
        {
            error = $"virtual size {parsed.Size} is too large";
            return false;
        }

        if (backingOffset != 0)
        {
            if (backingSize is 0 or > 1023 || backingOffset >= (ulong)clusterSize || backingOffset + backingSize > (ulong)Math.Min(clusterSize, data.Length))
            {
                error = $"invalid backing file name location (offset {backingOffset}, length {backingSize}): it must be at most 1023 bytes inside the first cluster";
                return false;
            }

            var name = data.Slice((int)backingOffset, (int)backingSize);
            parsed.BackingFile = Encoding.UTF8.GetString(name);
        }

        // Header extensions run from the end of the header to the backing file name (or the end of the cluster).
        var end = (int)Math.Min(Math.Min(clusterSize, data.Length), backingOffset > (ulong)headerLength ? (long)backingOffset : long.MaxValue);
        if (!parsed.TryParseExtensions(data[..end], headerLength, out error))
        {
            return false;
        }

        header = parsed;
        error = null;
        return true;
    }

    private bool TryParseExtensions(ReadOnlySpan<byte> data, int start, [NotNullWhen(false)] out string? error)
    {
        var position = start;
        var seen = new HashSet<uint>();
        var names = new List<Qcow2FeatureName>();
        while (true)
        {
            if (position + 8 > data.Length)
            {
                // qemu stops at the end of the cluster when no end marker fits: an image may end its area exactly.
                break;
            }

            var type = BinaryPrimitives.ReadUInt32BigEndian(data[position..]);
            var length = BinaryPrimitives.ReadUInt32BigEndian(data[(position + 4)..]);
            if (type == ExtensionEnd)
            {
                break;
            }

            var dataStart = position + 8;
            if (length > (uint)(data.Length - dataStart))
            {
                error = $"header extension 0x{type:x8} of {length} bytes runs past the header area";
                return false;
            }

            var payload = data.Slice(dataStart, (int)length);
            if (type is ExtensionBackingFormat or ExtensionFeatureNames or ExtensionBitmaps or ExtensionCryptoHeader or ExtensionExternalDataFile && !seen.Add(type))
            {
                error = $"header extension 0x{type:x8} appears twice";
                return false;
            }

            switch (type)
            {
                case ExtensionBackingFormat:
                    BackingFormat = Encoding.UTF8.GetString(payload);
                    break;
                case ExtensionExternalDataFile:
                    ExternalDataFile = Encoding.UTF8.GetString(payload);
                    break;
                case ExtensionCryptoHeader:
                    HasCryptoHeader = true;
                    break;
                case ExtensionFeatureNames:
                    // 48-byte entries: type (1), bit (1), name (46, zero padded).
                    for (var entry = 0; entry + 48 <= payload.Length; entry += 48)
                    {
                        var nameBytes = payload.Slice(entry + 2, 46);
                        var zero = nameBytes.IndexOf((byte)0);
                        names.Add(new Qcow2FeatureName(payload[entry], payload[entry + 1], Encoding.UTF8.GetString(zero < 0 ? nameBytes : nameBytes[..zero])));
                    }

                    break;
                case ExtensionBitmaps:
                    // nb_bitmaps (4), reserved (4), bitmap_directory_size (8), bitmap_directory_offset (8).
                    if (payload.Length < 24)
                    {
                        error = $"bitmaps header extension is {payload.Length} bytes, not 24";
                        return false;
                    }

                    Bitmaps = (BinaryPrimitives.ReadUInt32BigEndian(payload), BinaryPrimitives.ReadUInt64BigEndian(payload[8..]), BinaryPrimitives.ReadUInt64BigEndian(payload[16..]));
                    break;
                default:
                    // Unknown extensions can be safely ignored (qcow2.txt "Header extensions").
                    break;
            }

            position = dataStart + (int)((length + 7) & ~7u);
        }

        FeatureNames = names;
        error = null;
        return true;
    }

    /// <summary>The names of the set bits in <paramref name="bits"/>, from the feature name table when it has them.</summary>
    public string DescribeFeatures(int type, ulong bits)
    {
        var parts = new List<string>();
        for (var bit = 0; bit < 64; bit++)
        {
            if ((bits & (1UL << bit)) == 0)
            {
                continue;
            }

            var name = FeatureNames.FirstOrDefault(feature => feature.Type == type && feature.Bit == bit).Name;
            parts.Add(string.IsNullOrEmpty(name) ? $"bit {bit}" : $"bit {bit} '{name}'");
        }

        return string.Join(", ", parts);
    }
}
