using Spindle.Protocol;

namespace Spindle.Storage.Qcow2;

public sealed partial class Qcow2Image
{
    private static readonly byte[] ZeroBuffer = new byte[64 * 1024];

    /// <summary>
    /// Discards whole clusters as qemu does (qcow2-cluster.c discard, full_discard false): an allocated cluster, or any
    /// cluster over a backing file, becomes a zero cluster (v3; unallocated in v2) and its host cluster is freed;
    /// partial clusters are left alone (TRIM is advisory).
    /// </summary>
    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        MarkBitmaps(offset, length);
        var end = offset + length;
        var position = (offset + _clusterMask) & ~_clusterMask;
        while (position < end)
        {
            var clusterEnd = position + _clusterSize;
            if (clusterEnd > end && end != Size)
            {
                break;
            }

            lock (_meta)
            {
                EnsureWritable();
                DiscardClusterLocked(position >> _clusterBits);
            }

            position = clusterEnd;
        }

        Complete(fua);
        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// Zeroes as qemu does: whole clusters (or subclusters) become zero clusters, keeping their host cluster under
    /// NO_HOLE and freeing it otherwise; partial pieces are written as zero bytes. A version 2 image has no zero flag:
    /// without a backing file its clusters are deallocated, with one zeroes are written.
    /// </summary>
    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        EnsureWritable();
        var noHole = (flags & ZeroFlags.NoHole) != 0;
        if ((flags & ZeroFlags.FastOnly) != 0 && !CanZeroFast(offset, length))
        {
            throw new BlockDeviceException(NbdError.NotSupported, "zeroing this range needs data writes (unaligned, or a version 2 image over a backing file)");
        }

        MarkBitmaps(offset, length);
        var end = offset + length;
        var position = offset;
        while (position < end)
        {
            var clusterStart = position & ~_clusterMask;
            var pieceEnd = Math.Min(end, clusterStart + _clusterSize);
            var whole = position == clusterStart && (pieceEnd == clusterStart + _clusterSize || pieceEnd == Size);
            bool done;
            if (whole)
            {
                lock (_meta)
                {
                    EnsureWritable();
                    done = ZeroClusterLocked(clusterStart >> _clusterBits, noHole);
                }
            }
            else
            {
                done = ZeroPartialCluster(position, pieceEnd);
            }

            if (!done)
            {
                WriteZeroBytes(position, pieceEnd - position);
            }

            position = pieceEnd;
        }

        Complete((flags & ZeroFlags.Fua) != 0);
        return ValueTask.CompletedTask;
    }

    private bool CanZeroFast(long offset, long length)
    {
        if (_header.Version < 3 && _backing is not null)
        {
            return false;
        }

        var unit = _extended ? 1L << _subclusterBits : _clusterSize;
        var end = offset + length;
        return offset % unit == 0 && (end % unit == 0 || end == Size);
    }

    private void Complete(bool fua)
    {
        if (fua)
        {
            FlushCore();
        }
        else
        {
            MaybeApplyFrees();
        }
    }

    private void DiscardClusterLocked(long cluster)
    {
        var l2Offset = (long)(_l1[cluster >> _l2Bits] & OffsetMask);
        if (l2Offset == 0 && (_backing is null || _header.Version < 3))
        {
            return;
        }

        var (table, tableOffset) = GetL2ForWriteLocked(cluster);
        var slot = _extended ? (int)(cluster & L2EntryMask) * 2 : (int)(cluster & L2EntryMask);
        var entry = table[slot];
        CheckEntryLocked(entry, _extended ? table[slot + 1] : 0, cluster << _clusterBits);
        var allocated = (entry & CompressedFlag) != 0 || (entry & OffsetMask) != 0;
        if (!allocated && _backing is null)
        {
            return;
        }

        ulong newEntry = _header.Version >= 3 && !_extended ? ZeroFlag : 0;
        ulong newBitmap = _extended ? AllSubclustersZero : 0;
        if (entry == newEntry && (!_extended || table[slot + 1] == newBitmap))
        {
            return;
        }

        table[slot] = newEntry;
        if (_extended)
        {
            table[slot + 1] = newBitmap;
        }

        MarkL2DirtyLocked(tableOffset, table);
        if (allocated)
        {
            QueueFreeEntryLocked(entry);
        }
    }

    private const ulong AllSubclustersZero = 0xFFFF_FFFF_0000_0000;

    /// <summary>A whole cluster made to read as zeroes; false when zero bytes must be written instead (v2).</summary>
    private bool ZeroClusterLocked(long cluster, bool noHole)
    {
        var l2Offset = (long)(_l1[cluster >> _l2Bits] & OffsetMask);
        if (l2Offset == 0 && _backing is null)
        {
            return true; // nothing allocated: it reads as zeroes already
        }

        if (_header.Version < 3 && _backing is not null)
        {
            return false;
        }

        var (table, tableOffset) = GetL2ForWriteLocked(cluster);
        var slot = _extended ? (int)(cluster & L2EntryMask) * 2 : (int)(cluster & L2EntryMask);
        var entry = table[slot];
        CheckEntryLocked(entry, _extended ? table[slot + 1] : 0, cluster << _clusterBits);
        var compressed = (entry & CompressedFlag) != 0;
        var allocated = compressed || (entry & OffsetMask) != 0;
        ulong newEntry;
        bool unmap;
        if (_header.Version < 3)
        {
            if (noHole && allocated && !compressed && (entry & CopiedFlag) != 0)
            {
                return false; // keep the allocation: write zeroes into it
            }

            unmap = allocated;
            newEntry = 0;
        }
        else
        {
            // qemu's zero_in_l2_slice: unmap compressed clusters always, others unless NO_HOLE; keep the entry otherwise.
            unmap = compressed || (!noHole && allocated);
            newEntry = unmap ? 0 : entry;
            if (!_extended)
            {
                newEntry |= ZeroFlag;
            }
        }

        var newBitmap = _extended ? AllSubclustersZero : 0;
        if (newEntry == entry && (!_extended || table[slot + 1] == newBitmap))
        {
            return true;
        }

        table[slot] = newEntry;
        if (_extended)
        {
            table[slot + 1] = newBitmap;
        }

        MarkL2DirtyLocked(tableOffset, table);
        if (unmap)
        {
            QueueFreeEntryLocked(entry);
        }

        return true;
    }

    /// <summary>
    /// Part of a cluster: with subclusters, the whole subclusters inside become zero subclusters (qemu's
    /// zero_l2_subclusters) and the edges are written; otherwise nothing to do if it reads as zeroes already.
    /// Returns false when the caller must write zero bytes over the whole piece.
    /// </summary>
    private bool ZeroPartialCluster(long start, long end)
    {
        if (!_extended)
        {
            lock (_meta)
            {
                var run = MapRunLocked(start, end - start);
                var zero = run.Kind == RunKind.Zero || (run.Kind == RunKind.Unallocated && (_backing is null || start >= _backing.Size));
                return zero && run.Length >= end - start;
            }
        }

        var unit = 1L << _subclusterBits;
        var first = (start + unit - 1) & ~(unit - 1);
        var last = end == Size ? ((end + unit - 1) & ~(unit - 1)) : end & ~(unit - 1);
        if (first >= last)
        {
            return false;
        }

        lock (_meta)
        {
            EnsureWritable();
            var cluster = start >> _clusterBits;
            var l2Offset = (long)(_l1[cluster >> _l2Bits] & OffsetMask);
            if (l2Offset != 0 || _backing is not null)
            {
                var (table, tableOffset) = GetL2ForWriteLocked(cluster);
                var slot = (int)(cluster & L2EntryMask) * 2;
                var entry = table[slot];
                CheckEntryLocked(entry, table[slot + 1], cluster << _clusterBits);
                if ((entry & CompressedFlag) != 0)
                {
                    return false;
                }

                var clusterStart = cluster << _clusterBits;
                var mask = SubclusterMask((int)((first - clusterStart) >> _subclusterBits), (int)((last - 1 - clusterStart) >> _subclusterBits));
                var bitmap = table[slot + 1];
                var newBitmap = (bitmap & ~(ulong)mask) | ((ulong)mask << 32);
                if (newBitmap != bitmap)
                {
                    table[slot + 1] = newBitmap;
                    MarkL2DirtyLocked(tableOffset, table);
                }
            }
        }

        if (start < first)
        {
            WriteZeroBytes(start, first - start);
        }

        if (last < end)
        {
            WriteZeroBytes(last, end - last);
        }

        return true;
    }

    private void WriteZeroBytes(long offset, long length)
    {
        for (var done = 0L; done < length;)
        {
            var count = (int)Math.Min(ZeroBuffer.Length, length - done);
            WriteCore(offset + done, ZeroBuffer.AsSpan(0, count));
            done += count;
        }
    }
}
