using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Storage.Qcow2;

public sealed partial class Qcow2Image
{
    /// <summary>The most bytes all snapshot L1 tables together may take (a bound on open-time work and memory).</summary>
    private const long MaximumSnapshotL1Bytes = 1L << 30;

    private const ulong ReftableOffsetMask = 0xFFFF_FFFF_FFFF_FE00; // refcount table entry: bits 9-63

    private readonly HashSet<int> _dirtyL1 = [];
    private readonly HashSet<int> _dirtyReftable = [];

    /// <summary>Cluster indexes the image uses for metadata: a data write or an allocation there is corruption.</summary>
    private readonly HashSet<long> _metadata = [];
    private TableCache<byte[]> _refblocks = null!;
    private ulong[] _reftable = [];
    private long _reftableOffset;
    private int _reftableClusters;
    private int _refblockBits;
    private long _freeHint;
    private List<(long Offset, long Length)> _pendingFrees = [];

    private void InitializeRefcounts(Qcow2OpenOptions options)
    {
        _refblockBits = _clusterBits + 3 - _header.RefcountOrder;
        var capacity = (int)Math.Clamp(options.RefcountCacheBytes / _clusterSize, 16, 1 << 20);
        _refblocks = new TableCache<byte[]>(capacity, (offset, block) => _file.Write(block, offset));
        if (_readOnly)
        {
            return;
        }

        _reftableOffset = (long)_header.RefcountTableOffset;
        _reftableClusters = (int)_header.RefcountTableClusters;
        _reftable = ReadTable(_reftableOffset, (int)((long)_reftableClusters * _clusterSize / 8));
        AddMetadata(0, _clusterSize);
        AddMetadata(_reftableOffset, (long)_reftableClusters * _clusterSize);
        AddMetadata(_l1Offset, _l1.Length * 8L);
        for (var i = 0; i < _reftable.Length; i++)
        {
            var block = (long)(_reftable[i] & ReftableOffsetMask);
            if (block == 0)
            {
                continue;
            }

            if ((block & _clusterMask) != 0 || block > _file.Length - _clusterSize)
            {
                throw new Qcow2FormatException($"{_file.Path}: refcount block {i} at 0x{block:x} is misaligned or outside the file; repair it with 'qemu-img check -r all'");
            }

            _metadata.Add(block >> _clusterBits);
        }

        foreach (var entry in _l1)
        {
            var table = (long)(entry & OffsetMask);
            if (table != 0)
            {
                _metadata.Add(table >> _clusterBits);
            }
        }

        if (_header.SnapshotCount > 0)
        {
            AddMetadata((long)_header.SnapshotsOffset, 1);
            // Bounded work: each snapshot L1 table must lie in the file within qemu's limit, and all of them together
            // may not name more clusters than a hostile table could make us walk for long.
            long total = 0;
            foreach (var snapshot in _snapshots)
            {
                if (snapshot.L1TableOffset <= 0 || snapshot.L1Size <= 0)
                {
                    continue;
                }

                var bytes = snapshot.L1Size * 8L;
                if (bytes > MaximumL1Bytes || (snapshot.L1TableOffset & _clusterMask) != 0 || snapshot.L1TableOffset > _file.Length - bytes)
                {
                    throw new Qcow2FormatException($"{_file.Path}: snapshot '{snapshot.Name}' has an invalid L1 table; repair it with 'qemu-img check -r all'");
                }

                total += bytes;
                if (total > MaximumSnapshotL1Bytes)
                {
                    throw new Qcow2FormatException($"{_file.Path}: the snapshot L1 tables take more than {MaximumSnapshotL1Bytes} bytes together");
                }

                AddMetadata(snapshot.L1TableOffset, bytes);
            }
        }
    }

    private void AddMetadata(long offset, long length)
    {
        if (length <= 0)
        {
            return;
        }

        for (var cluster = offset >> _clusterBits; cluster <= (offset + length - 1) >> _clusterBits; cluster++)
        {
            _metadata.Add(cluster);
        }
    }

    private long RefblockEntries => 1L << _refblockBits;

    /// <summary>The refcount of a host cluster (0 where no refcount block exists). Caller holds <see cref="_meta"/>.</summary>
    private ulong GetRefcountLocked(long cluster)
    {
        var blockIndex = cluster >> _refblockBits;
        if (blockIndex >= _reftable.Length)
        {
            return 0;
        }

        var blockOffset = (long)(_reftable[blockIndex] & ReftableOffsetMask);
        return blockOffset == 0 ? 0 : ReadRefcount(GetRefblockLocked(blockOffset), (int)(cluster & (RefblockEntries - 1)));
    }

    private void SetRefcountLocked(long cluster, ulong value)
    {
        var blockOffset = (long)(_reftable[cluster >> _refblockBits] & ReftableOffsetMask);
        var block = GetRefblockLocked(blockOffset);
        WriteRefcount(block, (int)(cluster & (RefblockEntries - 1)), value);
        if (!_refblocks.MarkDirty(blockOffset))
        {
            _refblocks.Add(blockOffset, block, dirty: true);
        }
    }

    private byte[] GetRefblockLocked(long offset)
    {
        if (_refblocks.TryGet(offset, out var block))
        {
            return block;
        }

        if ((offset & _clusterMask) != 0 || offset < _clusterSize || offset > _file.Length - _clusterSize)
        {
            throw Corrupt($"the refcount block offset 0x{offset:x} is misaligned or outside the file");
        }

        block = new byte[_clusterSize];
        _file.Read(block, offset);
        _refblocks.Add(offset, block, dirty: false);
        return block;
    }

    /// <summary>Refcount block entry <paramref name="index"/> (qcow2.txt "Refcount block entry"; sub-byte widths LSB first).</summary>
    private ulong ReadRefcount(byte[] block, int index) => _header.RefcountOrder switch
    {
        < 3 => (ulong)(block[(index << _header.RefcountOrder) >> 3] >> ((index << _header.RefcountOrder) & 7)) & ((1UL << (1 << _header.RefcountOrder)) - 1),
        3 => block[index],
        4 => BinaryPrimitives.ReadUInt16BigEndian(block.AsSpan(index * 2)),
        5 => BinaryPrimitives.ReadUInt32BigEndian(block.AsSpan(index * 4)),
        _ => BinaryPrimitives.ReadUInt64BigEndian(block.AsSpan(index * 8)),
    };

    private void WriteRefcount(byte[] block, int index, ulong value)
    {
        var order = _header.RefcountOrder;
        if (order < 6 && value >= 1UL << (1 << order))
        {
            throw Corrupt($"a refcount of {value} overflows {1 << order}-bit refcounts");
        }

        switch (order)
        {
            case < 3:
                var bit = index << order;
                var mask = (byte)(((1 << (1 << order)) - 1) << (bit & 7));
                block[bit >> 3] = (byte)((block[bit >> 3] & ~mask) | ((int)value << (bit & 7)));
                break;
            case 3:
                block[index] = (byte)value;
                break;
            case 4:
                BinaryPrimitives.WriteUInt16BigEndian(block.AsSpan(index * 2), (ushort)value);
                break;
            case 5:
                BinaryPrimitives.WriteUInt32BigEndian(block.AsSpan(index * 4), (uint)value);
                break;
            default:
                BinaryPrimitives.WriteUInt64BigEndian(block.AsSpan(index * 8), value);
                break;
        }
    }

    /// <summary>
    /// Allocates one host cluster (refcount 0 -> 1, in the cached refcount block; written back before anything that
    /// points at the cluster). A missing refcount block is created inside the range it describes, written at once and
    /// linked from the refcount table at the next flush; a full refcount table is grown.
    /// </summary>
    private long AllocateClusterLocked()
    {
        var limit = (1L << 56) >> _clusterBits; // host offsets are at most 56 bits
        for (var attempts = 0; attempts < 1 << 20; attempts++)
        {
            var candidate = _freeHint;
            if (candidate >= limit)
            {
                throw new BlockDeviceException(NbdError.NoSpace, $"{Description}: no host cluster left below 64 PiB");
            }

            var blockIndex = candidate >> _refblockBits;
            if (blockIndex >= _reftable.Length)
            {
                GrowRefcountTableLocked(candidate);
                continue;
            }

            var blockOffset = (long)(_reftable[blockIndex] & ReftableOffsetMask);
            if (blockOffset == 0)
            {
                CreateRefblockLocked(blockIndex, candidate);
                continue;
            }

            var block = GetRefblockLocked(blockOffset);
            var entries = (int)RefblockEntries;
            for (var index = (int)(candidate & (entries - 1)); index < entries; index++)
            {
                if (ReadRefcount(block, index) != 0)
                {
                    continue;
                }

                var cluster = (blockIndex << _refblockBits) + index;
                if (_metadata.Contains(cluster))
                {
                    throw Corrupt($"host cluster {cluster} holds metadata but its refcount is 0");
                }

                WriteRefcount(block, index, 1);
                if (!_refblocks.MarkDirty(blockOffset))
                {
                    _refblocks.Add(blockOffset, block, dirty: true);
                }

                _freeHint = cluster + 1;
                return cluster << _clusterBits;
            }

            _freeHint = (blockIndex + 1) << _refblockBits;
        }

        throw new BlockDeviceException(NbdError.IO, $"{Description}: no free cluster found");
    }

    /// <summary>A new refcount block placed in the first free cluster it describes, so it counts itself.</summary>
    private void CreateRefblockLocked(long blockIndex, long cluster)
    {
        if (_metadata.Contains(cluster))
        {
            throw Corrupt($"host cluster {cluster} holds metadata but has no refcount block");
        }

        var block = new byte[_clusterSize];
        WriteRefcount(block, (int)(cluster & (RefblockEntries - 1)), 1);
        var offset = cluster << _clusterBits;
        _file.Write(block, offset); // fully written before the refcount table links it (at the next flush, after a sync)
        _refblocks.Add(offset, block, dirty: false);
        _reftable[blockIndex] = (ulong)offset;
        _dirtyReftable.Add((int)blockIndex);
        _metadata.Add(cluster);
        _freeHint = cluster + 1;
    }

    /// <summary>
    /// Moves the refcount table to a bigger one placed with its own new refcount blocks at <paramref name="start"/>
    /// (beyond everything the old table describes): blocks and table are written and synced, then the header is
    /// switched in one 12-byte write and synced, and only then is the old table freed (qemu's refcount area layout).
    /// </summary>
    private void GrowRefcountTableLocked(long start)
    {
        FlushMetadataLocked();
        var perBlock = RefblockEntries;
        var pointersPerCluster = _clusterSize / 8;
        var oldEntries = _reftable.Length;
        long tableClusters = 0;
        long blockCount = 0;
        long firstBlock = start >> _refblockBits;
        for (var iteration = 0; iteration < 64; iteration++)
        {
            var areaEnd = start + blockCount + tableClusters;
            var lastBlock = Math.Max(firstBlock, (Math.Max(areaEnd, start + 1) - 1) >> _refblockBits);
            var entries = Math.Max(oldEntries, lastBlock + 1);
            var needClusters = (entries + pointersPerCluster - 1) / pointersPerCluster;
            var needBlocks = lastBlock - firstBlock + 1;
            if (needClusters == tableClusters && needBlocks == blockCount)
            {
                break;
            }

            tableClusters = Math.Max(needClusters, tableClusters);
            blockCount = needBlocks;
        }

        if (tableClusters * _clusterSize > MaximumReftableBytes)
        {
            throw new BlockDeviceException(NbdError.NoSpace, $"{Description}: the refcount table would exceed qemu's limit of {MaximumReftableBytes} bytes");
        }

        var table = new ulong[tableClusters * pointersPerCluster];
        Array.Copy(_reftable, table, oldEntries);
        var areaStart = start;
        var areaLength = blockCount + tableClusters;
        for (var k = 0L; k < blockCount; k++)
        {
            var blockCluster = start + k;
            var coverage = (firstBlock + k) << _refblockBits;
            var block = new byte[_clusterSize];
            for (var cluster = Math.Max(areaStart, coverage); cluster < Math.Min(areaStart + areaLength, coverage + perBlock); cluster++)
            {
                WriteRefcount(block, (int)(cluster - coverage), 1);
            }

            _file.Write(block, blockCluster << _clusterBits);
            table[firstBlock + k] = (ulong)(blockCluster << _clusterBits);
        }

        var tableOffset = (start + blockCount) << _clusterBits;
        WriteRefcountTableAndSwitchHeader(table, tableOffset, tableClusters);

        var oldOffset = _reftableOffset;
        var oldClusters = _reftableClusters;
        _reftable = table;
        _reftableOffset = tableOffset;
        _reftableClusters = (int)tableClusters;
        _dirtyReftable.Clear();
        for (var cluster = areaStart; cluster < areaStart + areaLength; cluster++)
        {
            _metadata.Add(cluster);
        }

        // The old table stays counted until the new header is durable (it is) and the next flush has passed.
        QueueFree(oldOffset, (long)oldClusters * _clusterSize);
        _freeHint = areaStart + areaLength;
    }

    /// <summary>
    /// Writes a new refcount table at <paramref name="tableOffset"/> and makes it durable, then points the header
    /// at it and makes that durable: the header never names a table that is not yet on disk (growth and rebuild).
    /// </summary>
    private void WriteRefcountTableAndSwitchHeader(ulong[] table, long tableOffset, long tableClusters)
    {
        var bytes = new byte[tableClusters * _clusterSize];
        for (var i = 0; i < table.Length; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(i * 8), table[i]);
        }

        _file.Write(bytes, tableOffset);
        _file.Sync();

        Span<byte> field = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(field, (ulong)tableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(field[8..], (uint)tableClusters);
        _file.Write(field, Qcow2Header.OffsetRefcountTableOffset);
        _file.Sync();
    }

    private void QueueFree(long offset, long length) => _pendingFrees.Add((offset, length));

    /// <summary>
    /// Applies refcount decrements whose pointers are already gone on disk. Clusters that reach 0 are dropped from
    /// the metadata set and caches and their space is given back to the file system.
    /// </summary>
    private void ApplyFreesLocked(List<(long Offset, long Length)> frees)
    {
        foreach (var (offset, length) in frees)
        {
            for (var cluster = offset >> _clusterBits; cluster <= (offset + length - 1) >> _clusterBits; cluster++)
            {
                var refcount = GetRefcountLocked(cluster);
                if (refcount == 0)
                {
                    throw Corrupt($"the refcount of host cluster {cluster} would drop below zero");
                }

                SetRefcountLocked(cluster, refcount - 1);
                if (refcount == 1)
                {
                    _metadata.Remove(cluster);
                    _l2Cache.Remove(cluster << _clusterBits);
                    _freeHint = Math.Min(_freeHint, cluster);
                    _file.PunchHole(cluster << _clusterBits, _clusterSize);
                }
            }
        }
    }
}
