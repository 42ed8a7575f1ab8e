using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;

namespace Spindle.Storage.Qcow2;

/// <summary>A persistent dirty bitmap of the image (qcow2.txt "Bitmaps").</summary>
/// <param name="Name">The bitmap's name; its metadata context is <c>qemu:dirty-bitmap:NAME</c>.</param>
/// <param name="Granularity">Bytes of the disk one bit stands for.</param>
/// <param name="Enabled">The auto flag: writes through this image mark the bitmap.</param>
/// <param name="InUse">The in_use flag was set when the image was opened: the bitmap was not saved (a crash), so
/// it is inconsistent and neither exposed nor updated, as qemu treats it (qemu-img bitmap --remove, or qemu-img check
/// -r all, clears it).</param>
/// <param name="Usable">Exposed as a metadata context (consistent, type 1, no incompatible extra data).</param>
public sealed record Qcow2BitmapInfo(string Name, long Granularity, bool Enabled, bool InUse, bool Usable);

public sealed partial class Qcow2Image
{
    private const uint BitmapInUse = 1u << 0;
    private const uint BitmapAuto = 1u << 1;
    private const uint BitmapExtraDataCompatible = 1u << 2;
    private const long MaximumBitmapDirectory = 1024L * 65535; // qemu's QCOW2_MAX_BITMAP_DIRECTORY_SIZE
    private const long MaximumBitmapBytes = 64L * 1024 * 1024; // qemu's BME_MAX_PHYS_SIZE
    private const long MaximumTotalBitmapBytes = 256L * 1024 * 1024; // all bitmaps of one image, held in memory

    private readonly List<DirtyBitmap> _bitmaps = [];
    private readonly List<string> _warnings = [];
    private readonly List<MetaContextSource> _metaContexts = [];
    private DirtyBitmap[] _trackedBitmaps = [];

    /// <summary>
    /// What was found at open and is worth telling the user though the image opened: bitmaps that are inconsistent
    /// (left in use by a crash) or ignored, a bitmaps extension without its autoclear bit.
    /// </summary>
    public IReadOnlyList<string> Warnings => _warnings;

    /// <summary>The image's persistent bitmaps (none when a snapshot is opened, or the extension is inconsistent).</summary>
    public IReadOnlyList<Qcow2BitmapInfo> Bitmaps => _bitmaps.Select(b => new Qcow2BitmapInfo(b.Name, 1L << b.GranularityBits, (b.Flags & BitmapAuto) != 0, b.InUseAtOpen, b.Usable)).ToList();

    private bool BitmapTablesDirty
    {
        get
        {
            foreach (var bitmap in _bitmaps)
            {
                if (bitmap.TableDirty)
                {
                    return true;
                }
            }

            return false;
        }
    }

    /// <summary>Reads the bitmap directory and every usable bitmap into memory.</summary>
    private void LoadBitmaps()
    {
        if (_header.Bitmaps is not { } extension || _header.Version < 3)
        {
            return;
        }

        if ((_header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) == 0)
        {
            // Without the autoclear bit the extension "must be considered inconsistent" (qcow2.txt autoclear bit 0).
            _warnings.Add("the bitmaps extension is inconsistent (its autoclear bit is clear, e.g. an older program wrote the image): bitmaps ignored");
            return;
        }

        if (!BitConverter.IsLittleEndian)
        {
            throw new Qcow2FormatException("persistent bitmaps need a little-endian host");
        }

        var (count, directorySize, directoryOffset) = extension;
        if (count is 0 or > 65535 || directorySize > MaximumBitmapDirectory || directorySize > (ulong)_file.Length ||
            directoryOffset > (ulong)_file.Length - directorySize || (directoryOffset & (ulong)_clusterMask) != 0 || directoryOffset == 0)
        {
            throw new Qcow2FormatException($"{_file.Path}: invalid bitmaps extension ({count} bitmaps, directory of {directorySize} bytes at {directoryOffset})");
        }

        var directory = new byte[directorySize];
        _file.Read(directory, (long)directoryOffset);
        if (!_readOnly)
        {
            AddMetadata((long)directoryOffset, (long)directorySize);
        }

        var position = 0;
        var names = new HashSet<string>(StringComparer.Ordinal);
        long totalBytes = 0;
        for (var i = 0; i < count; i++)
        {
            var bitmap = ParseBitmapEntry(directory, ref position, (long)directoryOffset, i);
            totalBytes += bitmap.DataBytes + (bitmap.Table.Length * 8L);
            if (totalBytes > MaximumTotalBitmapBytes)
            {
                throw new Qcow2FormatException($"{_file.Path}: the bitmaps need more than {MaximumTotalBitmapBytes} bytes of memory together");
            }

            if (!names.Add(bitmap.Name))
            {
                throw new Qcow2FormatException($"{_file.Path}: two bitmaps are named '{bitmap.Name}'");
            }

            _bitmaps.Add(bitmap);
            if (bitmap.InUseAtOpen)
            {
                _warnings.Add($"bitmap '{bitmap.Name}' is inconsistent: it was in use when the image was last closed (a crash); it is neither exposed nor updated");
            }
            else if (!bitmap.Usable)
            {
                _warnings.Add($"bitmap '{bitmap.Name}' has an unknown type or incompatible extra data: left as it is");
            }

            if (bitmap.Usable)
            {
                LoadBitmapData(bitmap);
                _metaContexts.Add(new BitmapContext(bitmap));
            }
        }
    }

    /// <summary>
    /// One bitmap directory entry.
    /// <code>
    ///  0                    8              12      16     17         18          20              24
    /// +--------------------+--------------+-------+------+----------+-----------+---------------+-------------+------+-----+
    /// | bitmap_table_offset| table_size   | flags | type | gran_bits| name_size | extra_data_sz | extra data  | name | pad |
    /// +--------------------+--------------+-------+------+----------+-----------+---------------+-------------+------+-----+
    /// </code>
    /// </summary>
    private DirtyBitmap ParseBitmapEntry(byte[] directory, ref int position, long directoryOffset, int index)
    {
        if (position + 24 > directory.Length)
        {
            throw new Qcow2FormatException($"{_file.Path}: bitmap directory entry {index} runs past the directory");
        }

        var entry = directory.AsSpan(position);
        var tableOffset = BinaryPrimitives.ReadUInt64BigEndian(entry);
        var tableSize = BinaryPrimitives.ReadUInt32BigEndian(entry[8..]);
        var flags = BinaryPrimitives.ReadUInt32BigEndian(entry[12..]);
        var type = entry[16];
        var granularityBits = entry[17];
        int nameSize = BinaryPrimitives.ReadUInt16BigEndian(entry[18..]);
        var extraSize = BinaryPrimitives.ReadUInt32BigEndian(entry[20..]);
        var length = 24L + extraSize + nameSize;
        if (nameSize is 0 or > 1023 || position + length > directory.Length)
        {
            throw new Qcow2FormatException($"{_file.Path}: bitmap directory entry {index} is malformed (name of {nameSize} bytes, {extraSize} bytes of extra data)");
        }

        var name = Encoding.UTF8.GetString(entry.Slice(24 + (int)extraSize, nameSize));
        if ((flags & ~(BitmapInUse | BitmapAuto | BitmapExtraDataCompatible)) != 0 || granularityBits is < 9 or > 31)
        {
            throw new Qcow2FormatException($"{_file.Path}: bitmap '{name}' has reserved flags 0x{flags:x} or granularity bits {granularityBits} outside 9..31");
        }

        var bitCount = (Size + (1L << granularityBits) - 1) >> granularityBits;
        var dataBytes = (bitCount + 7) / 8;
        var expectedTable = (dataBytes + _clusterSize - 1) / _clusterSize;
        if (dataBytes > MaximumBitmapBytes || tableSize != expectedTable || (tableOffset & (ulong)_clusterMask) != 0 ||
            tableOffset == 0 || tableOffset > (ulong)_file.Length || tableSize * 8L > _file.Length - (long)tableOffset)
        {
            throw new Qcow2FormatException($"{_file.Path}: bitmap '{name}' has an invalid table ({tableSize} entries at {tableOffset}, expected {expectedTable})");
        }

        var bitmap = new DirtyBitmap
        {
            Name = name,
            Flags = flags,
            GranularityBits = granularityBits,
            EntryOffset = directoryOffset + position,
            TableOffset = (long)tableOffset,
            Table = ReadTable((long)tableOffset, (int)tableSize),
            BitCount = bitCount,
            DataBytes = dataBytes,
            InUseAtOpen = (flags & BitmapInUse) != 0,
            Usable = type == 1 && (flags & BitmapInUse) == 0 && (extraSize == 0 || (flags & BitmapExtraDataCompatible) != 0),
        };
        foreach (var pointer in bitmap.Table)
        {
            var offset = (long)(pointer & OffsetMask);
            if ((pointer & ~(OffsetMask | 1)) != 0 || (offset & _clusterMask) != 0 || offset > _file.Length - _clusterSize || (offset != 0 && (pointer & 1) != 0))
            {
                throw new Qcow2FormatException($"{_file.Path}: bitmap '{name}' has an invalid table entry 0x{pointer:x16}");
            }
        }

        if (!_readOnly)
        {
            AddMetadata(bitmap.TableOffset, tableSize * 8L);
            foreach (var pointer in bitmap.Table)
            {
                if ((pointer & OffsetMask) != 0)
                {
                    _metadata.Add((long)(pointer & OffsetMask) >> _clusterBits);
                }
            }
        }

        position += (int)((length + 7) & ~7L);
        return bitmap;
    }

    private void LoadBitmapData(DirtyBitmap bitmap)
    {
        bitmap.Words = new long[(bitmap.BitCount + 63) / 64];
        bitmap.DirtyClusters = new bool[bitmap.Table.Length];
        var bytes = MemoryMarshal.AsBytes(bitmap.Words.AsSpan());
        for (var j = 0; j < bitmap.Table.Length; j++)
        {
            var start = (long)j * _clusterSize;
            var part = bytes.Slice((int)start, (int)Math.Min(_clusterSize, bitmap.DataBytes - start));
            var offset = (long)(bitmap.Table[j] & OffsetMask);
            if (offset != 0)
            {
                _file.Read(part, offset);
            }
            else if ((bitmap.Table[j] & 1) != 0)
            {
                part.Fill(0xFF);
            }
        }

        // Bits past the end of the disk are zero (qcow2.txt "Bitmap data": unused tail bits must be zero).
        var tail = (int)(bitmap.BitCount & 63);
        if (tail != 0)
        {
            bitmap.Words[^1] &= (1L << tail) - 1;
        }

        for (var b = (int)((bitmap.BitCount + 7) / 8); b < bytes.Length; b++)
        {
            bytes[b] = 0;
        }
    }

    /// <summary>Sets the in_use flag of every usable bitmap, as qemu does while it has the image open for writing.</summary>
    private void MarkBitmapsInUse()
    {
        var tracked = new List<DirtyBitmap>();
        foreach (var bitmap in _bitmaps.Where(b => b.Usable))
        {
            WriteBitmapFlags(bitmap, bitmap.Flags | BitmapInUse);
            bitmap.MarkedInUse = true;
            if ((bitmap.Flags & BitmapAuto) != 0)
            {
                tracked.Add(bitmap);
            }
        }

        _trackedBitmaps = [.. tracked];
        if (_bitmaps.Any(b => b.MarkedInUse))
        {
            _file.Sync();
        }
    }

    /// <summary>After the final flush stored them, clears the in_use flags this instance set: a clean close.</summary>
    private void CloseBitmaps()
    {
        var any = false;
        foreach (var bitmap in _bitmaps.Where(b => b.MarkedInUse))
        {
            WriteBitmapFlags(bitmap, bitmap.Flags & ~BitmapInUse);
            bitmap.MarkedInUse = false;
            any = true;
        }

        if (any)
        {
            _file.Sync();
        }
    }

    private void WriteBitmapFlags(DirtyBitmap bitmap, uint flags)
    {
        Span<byte> field = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(field, flags);
        _file.Write(field, bitmap.EntryOffset + 12);
    }

    /// <summary>Marks [offset, offset + length) dirty in every enabled bitmap (called before the data changes).</summary>
    private void MarkBitmaps(long offset, long length)
    {
        var tracked = _trackedBitmaps;
        if (tracked.Length == 0 || length <= 0)
        {
            return;
        }

        foreach (var bitmap in tracked)
        {
            var first = offset >> bitmap.GranularityBits;
            var last = Math.Min((offset + length - 1) >> bitmap.GranularityBits, bitmap.BitCount - 1);
            for (var bit = first; bit <= last;)
            {
                var word = (int)(bit >> 6);
                var upTo = Math.Min(last, ((long)word << 6) + 63);
                var mask = (upTo - bit == 63 ? -1L : ((1L << (int)(upTo - bit + 1)) - 1)) << (int)(bit & 63);
                if ((Volatile.Read(ref bitmap.Words[word]) & mask) != mask)
                {
                    Interlocked.Or(ref bitmap.Words[word], mask);
                    Volatile.Write(ref bitmap.DirtyClusters[(int)((long)word * 8 / _clusterSize)], true);
                }

                bit = upTo + 1;
            }
        }
    }

    /// <summary>Writes changed bitmap clusters: in place where allocated, else into a new cluster the table will link.</summary>
    private void StoreBitmapsLocked()
    {
        if (_trackedBitmaps.Length == 0)
        {
            return;
        }

        var buffer = _tableBuffer ??= new byte[_clusterSize];
        foreach (var bitmap in _trackedBitmaps)
        {
            var bytes = MemoryMarshal.AsBytes(bitmap.Words.AsSpan());
            for (var j = 0; j < bitmap.DirtyClusters.Length; j++)
            {
                if (!Volatile.Read(ref bitmap.DirtyClusters[j]))
                {
                    continue;
                }

                Volatile.Write(ref bitmap.DirtyClusters[j], false);
                var start = (long)j * _clusterSize;
                var length = (int)Math.Min(_clusterSize, bitmap.DataBytes - start);
                Array.Clear(buffer);
                bytes.Slice((int)start, length).CopyTo(buffer);
                var offset = (long)(bitmap.Table[j] & OffsetMask);
                if (offset == 0)
                {
                    if (buffer.AsSpan().IndexOfAnyExcept((byte)0) < 0 && (bitmap.Table[j] & 1) == 0)
                    {
                        continue;
                    }

                    offset = AllocateClusterLocked();
                    _metadata.Add(offset >> _clusterBits);
                    bitmap.Table[j] = (ulong)offset;
                    bitmap.TableDirty = true;
                }

                _file.Write(buffer, offset);
            }
        }
    }

    private void WriteBitmapTablesLocked()
    {
        foreach (var bitmap in _bitmaps.Where(b => b.TableDirty))
        {
            var bytes = new byte[bitmap.Table.Length * 8];
            for (var i = 0; i < bitmap.Table.Length; i++)
            {
                BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(i * 8), bitmap.Table[i]);
            }

            _file.Write(bytes, bitmap.TableOffset);
            bitmap.TableDirty = false;
        }
    }

    /// <summary>Done once a writable image is open: unknown autoclear bits cleared (qcow2.txt), bitmaps marked in use.</summary>
    private void PrepareForWriting()
    {
        if ((_header.IncompatibleFeatures & Qcow2Header.IncompatibleDirty) != 0)
        {
            RebuildRefcounts();
        }

        if (_header.Version >= 3)
        {
            var keep = _header.AutoclearFeatures & (_header.Bitmaps is not null ? Qcow2Header.AutoclearBitmaps : 0);
            if (keep != _header.AutoclearFeatures)
            {
                Span<byte> field = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64BigEndian(field, keep);
                _file.Write(field, Qcow2Header.OffsetAutoclearFeatures);
                _file.Sync();
            }
        }

        MarkBitmapsInUse();
    }

    private sealed class DirtyBitmap
    {
        public required string Name;
        public uint Flags;
        public int GranularityBits;
        public long EntryOffset;
        public long TableOffset;
        public required ulong[] Table;
        public long BitCount;
        public long DataBytes;
        public bool InUseAtOpen;
        public bool Usable;
        public bool MarkedInUse;
        public bool TableDirty;
        public long[] Words = [];
        public bool[] DirtyClusters = [];

        public bool Get(long bit) => ((Volatile.Read(ref Words[(int)(bit >> 6)]) >> (int)(bit & 63)) & 1) != 0;
    }

    /// <summary>qemu:dirty-bitmap:NAME: status 1 where the bitmap is dirty, 0 where clean, at its granularity.</summary>
    private sealed class BitmapContext(DirtyBitmap bitmap) : MetaContextSource
    {
        public override string Name => Spindle.Protocol.MetaContexts.DirtyBitmapPrefix + bitmap.Name;

        public override ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken)
        {
            ArgumentNullException.ThrowIfNull(status);
            var end = offset + length;
            var position = offset;
            var shift = bitmap.GranularityBits;
            while (position < end && !status.IsFull)
            {
                var bit = position >> shift;
                var dirty = bit < bitmap.BitCount && bitmap.Get(bit);
                var next = bit + 1;
                while (next < bitmap.BitCount && (next << shift) < end)
                {
                    // Skip whole words that match.
                    if ((next & 63) == 0 && next + 64 <= bitmap.BitCount)
                    {
                        var word = Volatile.Read(ref bitmap.Words[(int)(next >> 6)]);
                        if (word == (dirty ? -1L : 0L))
                        {
                            next += 64;
                            continue;
                        }
                    }

                    if (bitmap.Get(next) != dirty)
                    {
                        break;
                    }

                    next++;
                }

                var runEnd = Math.Min(next << shift, end);
                status.Add(runEnd - position, dirty ? 1u : 0u);
                position = runEnd;
            }

            return ValueTask.CompletedTask;
        }
    }
}
