using System.Buffers.Binary;

namespace Spindle.Storage.Qcow2;

public sealed partial class Qcow2Image
{
    /// <summary>The most host clusters a refcount rebuild counts in memory (4 bytes each).</summary>
    private const long MaximumRebuildClusters = 1L << 26;

    /// <summary>
    /// Rebuilds the refcounts of an image left dirty by a crash with lazy refcounts (qcow2.txt incompatible bit 0:
    /// "scan L1/L2 tables to repair refcounts before accessing the image"), as qemu does when it opens such an image
    /// for writing. Every reference is counted (header, L1 and L2 tables and their clusters for the active image and
    /// each snapshot, the snapshot table, bitmaps), a complete new refcount structure is written beyond the end of the
    /// file, synced, switched in the header with one write, synced, and only then is the dirty bit cleared. A crash
    /// at any point leaves either the old (dirty, still repairable) or the new (exact) refcounts.
    /// </summary>
    private void RebuildRefcounts()
    {
        var fileClusters = (_file.Length + _clusterMask) >> _clusterBits;
        if (fileClusters > MaximumRebuildClusters)
        {
            throw new Qcow2FormatException($"{_file.Path}: too large ({fileClusters} clusters) to rebuild its refcounts here; run 'qemu-img check -r all'");
        }

        var counts = new uint[fileClusters];
        void Count(long offset, long length, string what, uint times = 1)
        {
            if (length <= 0)
            {
                return;
            }

            if (offset < 0 || offset + length > fileClusters << _clusterBits)
            {
                throw new Qcow2FormatException($"{_file.Path}: the {what} at 0x{offset:x} lies outside the file; run 'qemu-img check -r all'");
            }

            for (var cluster = offset >> _clusterBits; cluster <= (offset + length - 1) >> _clusterBits; cluster++)
            {
                counts[cluster] = (uint)Math.Min((ulong)counts[cluster] + times, uint.MaxValue);
            }
        }

        Count(0, _clusterSize, "header");
        Count((long)_header.SnapshotsOffset, _snapshotTableLength, "snapshot table");
        var tables = new List<(long Offset, int Entries, bool Active)> { ((long)_header.L1TableOffset, (int)_header.L1Size, true) };
        tables.AddRange(_snapshots.Where(s => s.L1Size > 0).Select(s => (s.L1TableOffset, s.L1Size, false)));
        // Each L1 path to an L2 table counts the table and its clusters once: shared tables are read once and their
        // clusters counted as many times as tables point at them, so the work is bounded by the file, not the paths.
        var l2 = new byte[_clusterSize];
        var stride = _extended ? 16 : 8;
        var paths = new Dictionary<long, uint>();
        foreach (var (offset, entries, active) in tables)
        {
            Count(offset, entries * 8L, "L1 table");
            foreach (var l1Entry in active ? _l1 : ReadTable(offset, entries))
            {
                var table = (long)(l1Entry & OffsetMask);
                if (table != 0)
                {
                    Count(table, _clusterSize, "L2 table");
                    paths[table] = paths.GetValueOrDefault(table) + 1;
                }
            }
        }

        foreach (var (table, times) in paths)
        {
            _file.Read(l2, table);
            for (var i = 0; i < _clusterSize; i += stride)
            {
                var entry = BinaryPrimitives.ReadUInt64BigEndian(l2.AsSpan(i));
                if ((entry & CompressedFlag) != 0)
                {
                    var x = 62 - (_clusterBits - 8);
                    var start = (long)(entry & ((1UL << x) - 1));
                    var sectors = (long)((entry >> x) & ((1UL << (_clusterBits - 8)) - 1)) + 1;
                    Count(start & ~511L, sectors * 512, "compressed cluster", times);
                }
                else if ((entry & OffsetMask) != 0)
                {
                    Count((long)(entry & OffsetMask), _clusterSize, "data cluster", times);
                }
            }
        }

        if (_header.Bitmaps is { } bitmaps)
        {
            Count((long)bitmaps.DirectoryOffset, (long)bitmaps.DirectorySize, "bitmap directory");
        }

        foreach (var bitmap in _bitmaps)
        {
            Count(bitmap.TableOffset, bitmap.Table.Length * 8L, "bitmap table");
            foreach (var pointer in bitmap.Table)
            {
                Count((long)(pointer & OffsetMask), (pointer & OffsetMask) != 0 ? _clusterSize : 0, "bitmap cluster");
            }
        }

        // The active tables must agree with the counts on "refcount is exactly one" (bit 63), or in-place writes would
        // reach shared clusters: such an image is left to qemu-img check, which rewrites the flags.
        foreach (var l1Entry in _l1)
        {
            var table = (long)(l1Entry & OffsetMask);
            if (table == 0)
            {
                continue;
            }

            if (((l1Entry & CopiedFlag) != 0) != (counts[table >> _clusterBits] == 1))
            {
                throw new Qcow2FormatException($"{_file.Path}: its L1 copied flags disagree with the references; run 'qemu-img check -r all'");
            }

            _file.Read(l2, table);
            for (var i = 0; i < _clusterSize; i += stride)
            {
                var entry = BinaryPrimitives.ReadUInt64BigEndian(l2.AsSpan(i));
                var host = (long)(entry & OffsetMask);
                if ((entry & CompressedFlag) == 0 && host != 0 && ((entry & CopiedFlag) != 0) != (counts[host >> _clusterBits] == 1))
                {
                    throw new Qcow2FormatException($"{_file.Path}: its L2 copied flags disagree with the references; run 'qemu-img check -r all'");
                }
            }
        }

        WriteRebuiltRefcounts(counts, fileClusters);
    }

    private void WriteRebuiltRefcounts(uint[] counts, long start)
    {
        // A new area at the end of the file: refcount blocks for every cluster up to the area's end, then the table.
        var perBlock = RefblockEntries;
        var pointersPerCluster = _clusterSize / 8;
        long blocks = 0, tableClusters = 1;
        for (var iteration = 0; iteration < 64; iteration++)
        {
            var end = start + blocks + tableClusters;
            var needBlocks = (end + perBlock - 1) / perBlock;
            var needTable = (needBlocks + pointersPerCluster - 1) / pointersPerCluster;
            if (needBlocks == blocks && needTable == tableClusters)
            {
                break;
            }

            blocks = needBlocks;
            tableClusters = Math.Max(needTable, tableClusters);
        }

        if (tableClusters * _clusterSize > MaximumReftableBytes)
        {
            throw new Qcow2FormatException($"{_file.Path}: the rebuilt refcount table would exceed {MaximumReftableBytes} bytes");
        }

        // Every count is checked before the first block is written: an overflow found halfway would otherwise leave
        // the file grown by the blocks already written (the new area's own clusters count 1, which always fits).
        var maximum = _header.RefcountOrder >= 6 ? ulong.MaxValue : (1UL << (1 << _header.RefcountOrder)) - 1;
        for (var cluster = 0L; cluster < counts.Length; cluster++)
        {
            if (counts[cluster] > maximum)
            {
                throw new Qcow2FormatException($"{_file.Path}: cluster {cluster} has {counts[cluster]} references, more than {1 << _header.RefcountOrder}-bit refcounts hold; run 'qemu-img check -r all'");
            }
        }

        var areaEnd = start + blocks + tableClusters;
        var table = new ulong[tableClusters * pointersPerCluster];
        var block = new byte[_clusterSize];
        for (var b = 0L; b < blocks; b++)
        {
            Array.Clear(block);
            for (var i = 0L; i < perBlock; i++)
            {
                var cluster = (b * perBlock) + i;
                ulong value = cluster < counts.Length ? counts[cluster] : cluster >= start && cluster < areaEnd ? 1u : 0u;
                if (value != 0)
                {
                    WriteRefcount(block, (int)i, value);
                }
            }

            _file.Write(block, (start + b) << _clusterBits);
            table[b] = (ulong)((start + b) << _clusterBits);
        }

        var tableOffset = (start + blocks) << _clusterBits;
        WriteRefcountTableAndSwitchHeader(table, tableOffset, tableClusters);

        Span<byte> features = stackalloc byte[8];
        _file.Read(features, Qcow2Header.OffsetIncompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(features, BinaryPrimitives.ReadUInt64BigEndian(features) & ~Qcow2Header.IncompatibleDirty);
        _file.Write(features, Qcow2Header.OffsetIncompatibleFeatures);
        _file.Sync();

        // From now on the new structure is the one in use; the old one is free space.
        foreach (var entry in _reftable)
        {
            var old = (long)(entry & ReftableOffsetMask);
            if (old != 0 && counts.Length > old >> _clusterBits && counts[old >> _clusterBits] == 0)
            {
                _metadata.Remove(old >> _clusterBits);
            }
        }

        for (var cluster = _reftableOffset >> _clusterBits; cluster < (_reftableOffset >> _clusterBits) + _reftableClusters; cluster++)
        {
            if (cluster < counts.Length && counts[cluster] == 0)
            {
                _metadata.Remove(cluster);
            }
        }

        _refblocks.Clear();
        _reftable = table;
        _reftableOffset = tableOffset;
        _reftableClusters = (int)tableClusters;
        _dirtyReftable.Clear();
        for (var cluster = start; cluster < areaEnd; cluster++)
        {
            _metadata.Add(cluster);
        }

        _freeHint = 0;
        RefcountsRebuilt = true;
    }

    /// <summary>The image was dirty (lazy refcounts, unclean close) and its refcounts were rebuilt at open.</summary>
    public bool RefcountsRebuilt { get; private set; }
}
