using System.Buffers.Binary;
using System.Text;
using Microsoft.Win32.SafeHandles;
using Spindle.Storage.Native;

namespace Spindle.Storage.Qcow2;

/// <summary>Image creation: what <c>qemu-img create -f qcow2 [-b BACKING -F FMT] PATH [SIZE]</c> writes.</summary>
public sealed partial class Qcow2Image
{
    private const int CreatedHeaderLength = 112; // 104 bytes of version 3 fields, the compression type, padding to 8
    private const int CreatedRefcountOrder = 4; // 16-bit refcounts, qemu's default
    private const int FeatureNameEntryBytes = 48;

    /// <summary>The feature name table qemu writes into every image it creates (qcow2.txt "Feature name table").</summary>
    private static readonly (byte Type, byte Bit, string Name)[] CreatedFeatureNames =
    [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];

    /// <summary>
    /// Creates a new, empty qcow2 image at <paramref name="path"/>: version 3 (compat 1.1), 16-bit refcounts, no
    /// lazy refcounts, zlib compression type, optionally with a backing file and the backing format extension. Every
    /// cluster reads from the backing file (or as zeroes) until written. The file appears whole or not at all
    /// (written under a temporary name, synced, then renamed), and an existing file is never replaced.
    /// </summary>
    /// <remarks>
    /// The layout is qemu's for every image whose metadata fits one refcount block (any size up to 4 TiB with 64 KiB
    /// clusters): the header in cluster 0, the refcount table in cluster 1, its one refcount block in cluster 2 and
    /// the L1 table from cluster 3, the file ending where the L1 table does. Larger tables follow one another in the
    /// same order.
    /// </remarks>
    /// <exception cref="ArgumentException">An option is out of range (no size and no backing file, a bad cluster size...).</exception>
    /// <exception cref="FileNotFoundException">The backing file does not exist.</exception>
    /// <exception cref="Qcow2FormatException">The backing file is not in the format named, or is a damaged qcow2 image.</exception>
    /// <exception cref="IOException"><paramref name="path"/> exists already, or writing it failed.</exception>
    public static void Create(string path, Qcow2CreateOptions options)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(options);
        var clusterSize = options.ClusterSize;
        if (clusterSize is < 512 or > 2 * 1024 * 1024 || (clusterSize & (clusterSize - 1)) != 0)
        {
            throw new ArgumentException($"cluster size {clusterSize} is not a power of two from 512 bytes to 2 MiB", nameof(options));
        }

        var fullPath = System.IO.Path.GetFullPath(path);
        string? format = null;
        long? backingSize = null;
        byte[] backingName = [];
        if (options.BackingFile is { } backing)
        {
            backingName = Encoding.UTF8.GetBytes(backing);
            if (backingName.Length is 0 or > Qcow2CreateOptions.MaximumBackingFileBytes || backing.Contains('\0', StringComparison.Ordinal))
            {
                throw new ArgumentException($"the backing file name must be 1 to {Qcow2CreateOptions.MaximumBackingFileBytes} bytes without NUL", nameof(options));
            }

            var directory = System.IO.Path.GetDirectoryName(fullPath) ?? "/";
            var backingPath = System.IO.Path.GetFullPath(System.IO.Path.IsPathRooted(backing) ? backing : System.IO.Path.Combine(directory, backing));
            (format, backingSize) = ProbeBackingFile(backingPath, options.BackingFormat);
        }
        else if (options.BackingFormat is not null)
        {
            throw new ArgumentException("a backing format needs a backing file", nameof(options));
        }

        var size = options.Size ?? backingSize ?? throw new ArgumentException("an image without a backing file needs a size", nameof(options));
        if (size < 0 || size > long.MaxValue - 511)
        {
            throw new ArgumentException($"size {size} is out of range", nameof(options));
        }

        size = (size + 511) & ~511L; // qemu-img rounds the size up to whole sectors
        var layout = CreateLayout.Compute(size, clusterSize);
        var header = CreateHeaderCluster(size, layout, backingName, format);
        AtomicFile.Create(fullPath, handle => WriteMetadata(handle, header, layout));
    }

    /// <summary>The header of the qcow2 image open as <paramref name="handle"/>, which stays the caller's.</summary>
    internal static Qcow2Header ReadHeaderOf(SafeFileHandle handle, string path)
    {
        // Disposing the wrapper closes the handle early; the caller's own dispose of it is then a no-op.
        using var file = ImageFile.FromHandle(handle, path);
        return ReadHeader(file);
    }

    /// <summary>The backing file's format (given, or detected) and its virtual size.</summary>
    private static (string Format, long Size) ProbeBackingFile(string path, string? requested)
    {
        if (requested is not null and not "raw" and not "qcow2")
        {
            throw new ArgumentException($"backing format '{requested}' is not raw or qcow2", nameof(requested));
        }

        if (!File.Exists(path))
        {
            throw new FileNotFoundException($"the backing file '{path}' does not exist", path);
        }

        using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        var isQcow2 = IsQcow2File(handle);
        var format = requested ?? (isQcow2 ? "qcow2" : "raw");
        if (format == "qcow2")
        {
            if (!isQcow2)
            {
                throw new Qcow2FormatException($"the backing file '{path}' is not a qcow2 image");
            }

            // Only the header is read (no lock is taken, no chain opened): its size field is all creation needs.
            using var file = ImageFile.FromHandle(handle, path);
            return (format, (long)ReadHeader(file).Size);
        }

        var length = LinuxFile.Seek(handle, 0, LinuxFile.SeekEnd);
        return length >= 0 ? (format, length) : throw new IOException($"cannot determine the size of '{path}' (errno {-length})");
    }

    private static byte[] CreateHeaderCluster(long size, CreateLayout layout, byte[] backingName, string? format)
    {
        var cluster = new byte[layout.ClusterSize];
        var span = cluster.AsSpan();
        BinaryPrimitives.WriteUInt32BigEndian(span, Qcow2Header.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(span[Qcow2Header.OffsetVersion..], 3);
        BinaryPrimitives.WriteUInt32BigEndian(span[Qcow2Header.OffsetClusterBits..], (uint)layout.ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(span[Qcow2Header.OffsetSize..], (ulong)size);
        BinaryPrimitives.WriteUInt32BigEndian(span[Qcow2Header.OffsetL1Size..], (uint)layout.L1Entries);
        BinaryPrimitives.WriteUInt64BigEndian(span[Qcow2Header.OffsetL1TableOffset..], (ulong)layout.L1Offset);
        BinaryPrimitives.WriteUInt64BigEndian(span[Qcow2Header.OffsetRefcountTableOffset..], (ulong)layout.RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(span[Qcow2Header.OffsetRefcountTableClusters..], (uint)layout.RefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(span[Qcow2Header.OffsetRefcountOrder..], CreatedRefcountOrder);
        BinaryPrimitives.WriteUInt32BigEndian(span[Qcow2Header.OffsetHeaderLength..], CreatedHeaderLength);

        // Header extensions (qcow2.txt "Header extensions"): type, length, data padded to 8 bytes; an all-zero end.
        var position = CreatedHeaderLength;
        if (format is not null)
        {
            position = WriteExtension(span, position, Qcow2Header.ExtensionBackingFormat, Encoding.UTF8.GetBytes(format));
        }

        var tableBytes = CreatedFeatureNames.Length * FeatureNameEntryBytes;
        if (layout.ClusterSize > 4096 && position + 8 + tableBytes + 8 + backingName.Length <= layout.ClusterSize)
        {
            // Only for tools naming feature bits. qemu leaves it out with clusters of 4 KiB and less, where its 392
            // bytes would leave little room for a backing file name; so does this, to write the same header.
            var table = new byte[tableBytes];
            for (var i = 0; i < CreatedFeatureNames.Length; i++)
            {
                var (type, bit, name) = CreatedFeatureNames[i];
                table[i * FeatureNameEntryBytes] = type;
                table[(i * FeatureNameEntryBytes) + 1] = bit;
                Encoding.ASCII.GetBytes(name, table.AsSpan((i * FeatureNameEntryBytes) + 2));
            }

            position = WriteExtension(span, position, Qcow2Header.ExtensionFeatureNames, table);
        }

        position += 8; // the end-of-extensions marker: eight zero bytes
        if (backingName.Length > 0)
        {
            if (position + backingName.Length > layout.ClusterSize)
            {
                throw new ArgumentException($"the backing file name ({backingName.Length} bytes) does not fit in a {layout.ClusterSize}-byte header cluster");
            }

            // The name follows the extensions, as qemu places it (qcow2.txt: "backing_file_offset").
            backingName.CopyTo(span[position..]);
            BinaryPrimitives.WriteUInt64BigEndian(span[Qcow2Header.OffsetBackingFileOffset..], (ulong)position);
            BinaryPrimitives.WriteUInt32BigEndian(span[Qcow2Header.OffsetBackingFileSize..], (uint)backingName.Length);
        }

        // What was written must read back as the image it describes: the parser is the reference.
        if (!Qcow2Header.TryParse(cluster, out _, out var error))
        {
            throw new InvalidOperationException($"the created header does not parse: {error}");
        }

        return cluster;
    }

    private static int WriteExtension(Span<byte> cluster, int position, uint type, ReadOnlySpan<byte> data)
    {
        BinaryPrimitives.WriteUInt32BigEndian(cluster[position..], type);
        BinaryPrimitives.WriteUInt32BigEndian(cluster[(position + 4)..], (uint)data.Length);
        data.CopyTo(cluster[(position + 8)..]);
        return position + 8 + ((data.Length + 7) & ~7);
    }

    /// <summary>Writes the header, refcount table and refcount blocks; the L1 table is all zeroes and left sparse.</summary>
    private static void WriteMetadata(SafeFileHandle handle, byte[] header, CreateLayout layout)
    {
        var clusterSize = layout.ClusterSize;
        RandomAccess.Write(handle, header, 0);

        var table = new byte[layout.RefcountTableClusters * (long)clusterSize];
        for (var i = 0; i < layout.RefcountBlocks; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan(i * 8), (ulong)(layout.RefcountBlocksOffset + ((long)i * clusterSize)));
        }

        RandomAccess.Write(handle, table, layout.RefcountTableOffset);

        // Every cluster of the metadata itself has refcount 1; nothing else is allocated yet.
        var entriesPerBlock = clusterSize / 2;
        var block = new byte[clusterSize];
        for (var i = 0; i < layout.RefcountBlocks; i++)
        {
            Array.Clear(block);
            var first = (long)i * entriesPerBlock;
            var count = (int)Math.Clamp(layout.TotalClusters - first, 0, entriesPerBlock);
            for (var entry = 0; entry < count; entry++)
            {
                BinaryPrimitives.WriteUInt16BigEndian(block.AsSpan(entry * 2), 1);
            }

            RandomAccess.Write(handle, block, layout.RefcountBlocksOffset + ((long)i * clusterSize));
        }

        RandomAccess.SetLength(handle, layout.FileLength);
    }

    /// <summary>Where the metadata of a new image goes, in clusters: header, refcount table, refcount blocks, L1 table.</summary>
    private sealed record CreateLayout(int ClusterSize, int ClusterBits, long L1Entries, long RefcountTableClusters, long RefcountBlocks, long L1Clusters)
    {
        public long RefcountTableOffset => ClusterSize;

        public long RefcountBlocksOffset => (1 + RefcountTableClusters) * ClusterSize;

        /// <summary>0 for an image of size 0, which has no L1 table (as qemu writes it).</summary>
        public long L1Offset => L1Entries == 0 ? 0 : (1 + RefcountTableClusters + RefcountBlocks) * ClusterSize;

        public long TotalClusters => 1 + RefcountTableClusters + RefcountBlocks + L1Clusters;

        /// <summary>The file ends with the last L1 entry, as qemu's does, or with the refcount blocks.</summary>
        public long FileLength => L1Entries == 0 ? (1 + RefcountTableClusters + RefcountBlocks) * ClusterSize : L1Offset + (L1Entries * 8);

        public static CreateLayout Compute(long size, int clusterSize)
        {
            var clusterBits = System.Numerics.BitOperations.Log2((uint)clusterSize);
            var bytesPerL1Entry = (long)clusterSize * (clusterSize / 8);
            var l1Entries = (size / bytesPerL1Entry) + (size % bytesPerL1Entry == 0 ? 0 : 1);
            if (l1Entries * 8 > MaximumL1Bytes)
            {
                throw new ArgumentException($"size {size} needs an L1 table of {l1Entries * 8} bytes, more than qemu's limit of {MaximumL1Bytes} (use larger clusters)");
            }

            long CeilClusters(long bytes) => (bytes + clusterSize - 1) / clusterSize;
            var l1Clusters = CeilClusters(l1Entries * 8);
            var entriesPerBlock = clusterSize / 2;

            // The refcount blocks describe themselves and the refcount table: grow both until they cover everything.
            long tableClusters = 1, blocks = 1;
            for (var round = 0; round < 16; round++)
            {
                var total = 1 + tableClusters + blocks + l1Clusters;
                var neededBlocks = (total + entriesPerBlock - 1) / entriesPerBlock;
                var neededTable = Math.Max(1, CeilClusters(neededBlocks * 8));
                if (neededBlocks == blocks && neededTable == tableClusters)
                {
                    break;
                }

                blocks = Math.Max(blocks, neededBlocks);
                tableClusters = Math.Max(tableClusters, neededTable);
            }

            return new CreateLayout(clusterSize, clusterBits, l1Entries, tableClusters, blocks, l1Clusters);
        }
    }
}
