using System.Buffers;
using System.Numerics;
using Spindle.Protocol;

namespace Spindle.Storage.Qcow2;

public sealed partial class Qcow2Image
{
    private const uint AllSubclusters = uint.MaxValue;

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        MarkBitmaps(offset, source.Length);
        WriteCore(offset, source.Span);
        if (fua)
        {
            FlushCore();
        }

        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// A buffered write into clusters this image owns alone, whose L2 tables are cached, is done at once (it only waits
    /// for the page cache, as a file's would). Anything needing allocation goes through <see cref="WriteAsync"/>.
    /// </summary>
    public override bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source)
    {
        if (_readOnly || _corrupt || source.IsEmpty)
        {
            return false;
        }

        long host;
        _gate.Enter();
        try
        {
            lock (_meta)
            {
                if (!IsMappingCachedLocked(offset))
                {
                    return false;
                }

                var run = MapRunLocked(offset, source.Length);
                if (run.Kind != RunKind.Data || !run.Copied || run.Length < source.Length)
                {
                    return false;
                }

                host = run.Host;
                CheckDataWriteLocked(host, source.Length);
            }

            MarkBitmaps(offset, source.Length);
            _file.Write(source, host);
            return true;
        }
        finally
        {
            _gate.Exit();
        }
    }

    /// <summary>
    /// Writes guest bytes. Clusters this image owns alone (L2 bit 63, every touched subcluster allocated) are written in
    /// place outside the metadata lock; anything else (allocation, copy-on-write, subcluster changes) is done cluster by
    /// cluster under the lock, data first and the L2 entry after (qcow2.md "Crash safety").
    /// </summary>
    private void WriteCore(long offset, ReadOnlySpan<byte> source)
    {
        _gate.Enter();
        try
        {
            var done = 0;
            while (done < source.Length)
            {
                var guest = offset + done;
                var remaining = source.Length - done;
                long host;
                int length;
                lock (_meta)
                {
                    EnsureWritable();
                    var run = MapRunLocked(guest, remaining);
                    if (run.Kind == RunKind.Data && run.Copied)
                    {
                        host = run.Host;
                        length = (int)Math.Min(run.Length, remaining);
                        CheckDataWriteLocked(host, length);
                    }
                    else
                    {
                        host = -1;
                        length = (int)Math.Min((guest | _clusterMask) + 1 - guest, remaining);
                        WriteClusterLocked(guest, source.Slice(done, length));
                    }
                }

                if (host >= 0)
                {
                    _file.Write(source.Slice(done, length), host);
                }

                done += length;
            }
        }
        finally
        {
            _gate.Exit();
        }
    }

    /// <summary>
    /// Writes <paramref name="data"/> (within one cluster) where the fast path cannot: the cluster is unallocated, zero,
    /// compressed, shared (refcount above 1) or has subclusters that are not allocated yet. The subclusters the write
    /// touches are completed from what they read as now (copy-on-write from the backing chain, zeroes, the old cluster).
    /// </summary>
    private void WriteClusterLocked(long guest, ReadOnlySpan<byte> data)
    {
        var cluster = guest >> _clusterBits;
        var inCluster = (int)(guest & _clusterMask);
        var clusterGuest = guest - inCluster;
        var (table, tableOffset) = GetL2ForWriteLocked(cluster);
        var slot = _extended ? (int)(cluster & L2EntryMask) * 2 : (int)(cluster & L2EntryMask);
        var entry = table[slot];
        var old = new OldCluster(this, clusterGuest, entry, _extended ? table[slot + 1] : 0);
        CheckEntryLocked(entry, _extended ? table[slot + 1] : 0, clusterGuest);
        var inPlace = !old.Compressed && old.Host != 0 && (entry & CopiedFlag) != 0;

        var first = inCluster >> _subclusterBits;
        var last = (inCluster + data.Length - 1) >> _subclusterBits;
        var touched = _extended ? SubclusterMask(first, last) : 1u;
        var copy = inPlace ? 0u : old.Compressed ? AllSubclusters : old.Allocated;
        if (!_extended && old.Compressed)
        {
            copy = 1;
        }

        var host = inPlace ? old.Host : AllocateClusterLocked();

        // The bytes to write: the touched subclusters whole (completed from their current contents), except that a
        // subcluster already allocated in place keeps its other bytes (a concurrent fast-path write may own them).
        var start = first << _subclusterBits;
        var end = (last + 1) << _subclusterBits;
        if (inPlace && (old.Allocated & (1u << first)) != 0)
        {
            start = inCluster;
        }

        if (inPlace && (old.Allocated & (1u << last)) != 0)
        {
            end = inCluster + data.Length;
        }

        if (copy != 0)
        {
            start = Math.Min(start, BitOperations.TrailingZeroCount(copy) << _subclusterBits);
            end = Math.Max(end, (32 - BitOperations.LeadingZeroCount(copy)) << _subclusterBits);
        }

        end = Math.Min(end, _clusterSize);
        var buffer = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            var count = _extended ? 32 : 1;
            var size = 1 << _subclusterBits;
            for (var s = 0; s < count; s++)
            {
                var from = Math.Max(s * size, start);
                var to = Math.Min((s + 1) * size, end);
                if (from >= to)
                {
                    continue;
                }

                if ((touched & (1u << s)) != 0)
                {
                    if (from < inCluster)
                    {
                        old.Read(s, from, buffer.AsSpan(from, Math.Min(to, inCluster) - from));
                    }

                    var tail = Math.Max(from, inCluster + data.Length);
                    if (tail < to)
                    {
                        old.Read(s, tail, buffer.AsSpan(tail, to - tail));
                    }
                }
                else if ((copy & (1u << s)) != 0)
                {
                    old.Read(s, from, buffer.AsSpan(from, to - from));
                }
                else
                {
                    buffer.AsSpan(from, to - from).Clear();
                }
            }

            data.CopyTo(buffer.AsSpan(inCluster));
            CheckDataWriteLocked(host + start, end - start);
            _file.Write(buffer.AsSpan(start, end - start), host + start);
        }
        finally
        {
            old.Dispose();
            ArrayPool<byte>.Shared.Return(buffer);
        }

        // Only now that the data is written does the L2 entry point at it.
        table[slot] = (ulong)host | CopiedFlag;
        if (_extended)
        {
            var allocated = (inPlace ? old.Allocated : old.Compressed ? AllSubclusters : old.Allocated) | touched;
            var zero = old.Compressed ? 0u : old.Zero & ~allocated;
            table[slot + 1] = allocated | ((ulong)zero << 32);
        }

        MarkL2DirtyLocked(tableOffset, table);
        if (!inPlace)
        {
            QueueFreeEntryLocked(entry);
        }
    }

    /// <summary>Refuses to build on an L2 entry the spec forbids (misaligned host, contradictory subcluster bits).</summary>
    private void CheckEntryLocked(ulong entry, ulong bitmap, long clusterGuest)
    {
        if ((entry & CompressedFlag) != 0)
        {
            CheckCompressed(entry);
            return;
        }

        var host = (long)(entry & OffsetMask);
        if ((host & _clusterMask) != 0)
        {
            throw Corrupt($"the L2 entry of guest offset {clusterGuest} points at a misaligned host offset 0x{host:x}");
        }

        if (_extended && (((uint)bitmap & (uint)(bitmap >> 32)) != 0 || ((uint)bitmap != 0 && host == 0)))
        {
            throw Corrupt($"the L2 entry of guest offset {clusterGuest} has an invalid subcluster bitmap 0x{bitmap:x16}");
        }
    }

    private static uint SubclusterMask(int first, int last) =>
        (last >= 31 ? uint.MaxValue : (1u << (last + 1)) - 1) & ~((1u << first) - 1);

    /// <summary>
    /// The L2 table covering <paramref name="cluster"/>, ready to be modified: a new zeroed table when there is none, a
    /// copy when the table is shared with a snapshot (L1 bit 63 clear). The new table is cached dirty and reaches the
    /// disk before the L1 entry that points at it.
    /// </summary>
    private (ulong[] Table, long Offset) GetL2ForWriteLocked(long cluster)
    {
        var l1Index = cluster >> _l2Bits;
        if (l1Index >= _l1.Length)
        {
            throw new BlockDeviceException(NbdError.InvalidArgument, $"guest cluster {cluster} lies beyond the L1 table");
        }

        var l1Entry = _l1[l1Index];
        var offset = (long)(l1Entry & OffsetMask);
        if (offset != 0 && (l1Entry & CopiedFlag) != 0)
        {
            return (GetL2Locked(offset), offset);
        }

        var shared = offset != 0 ? (ulong[])GetL2Locked(offset).Clone() : null;
        var newOffset = AllocateClusterLocked();
        var table = shared ?? new ulong[_clusterSize / 8];
        _l2Cache.Add(newOffset, table, dirty: true);
        _metadata.Add(newOffset >> _clusterBits);
        _l1[l1Index] = (ulong)newOffset | CopiedFlag;
        _dirtyL1.Add((int)l1Index);
        if (offset != 0)
        {
            // The snapshot keeps the old table: one reference fewer, once the new L1 entry is on disk.
            QueueFree(offset, _clusterSize);
        }

        return (table, newOffset);
    }

    private void MarkL2DirtyLocked(long offset, ulong[] table)
    {
        if (!_l2Cache.MarkDirty(offset))
        {
            _l2Cache.Add(offset, table, dirty: true);
        }
    }

    /// <summary>Releases what an L2 entry pointed at: its host cluster, or the sectors of a compressed cluster.</summary>
    private void QueueFreeEntryLocked(ulong entry)
    {
        if ((entry & CompressedFlag) != 0)
        {
            // qemu frees the 512-byte sectors the compressed data occupies; every cluster they touch loses a reference.
            var x = 62 - (_clusterBits - 8);
            var offset = (long)(entry & ((1UL << x) - 1));
            var sectors = (long)((entry >> x) & ((1UL << (_clusterBits - 8)) - 1)) + 1;
            QueueFree(offset & ~511L, sectors * 512);
            return;
        }

        var host = (long)(entry & OffsetMask);
        if (host != 0)
        {
            QueueFree(host, _clusterSize);
        }
    }

    /// <summary>Refuses a data write into a cluster the image uses as metadata (qemu's overlap check): corruption.</summary>
    private void CheckDataWriteLocked(long host, long length)
    {
        if ((host & _clusterMask) == 0 && length == _clusterSize && !_metadata.Contains(host >> _clusterBits))
        {
            return;
        }

        for (var cluster = host >> _clusterBits; cluster <= (host + length - 1) >> _clusterBits; cluster++)
        {
            if (_metadata.Contains(cluster))
            {
                throw Corrupt($"a data write at host offset 0x{host:x} would overwrite metadata (cluster {cluster})");
            }
        }
    }

    /// <summary>What a cluster read as before a write changes it, to complete partially written subclusters from.</summary>
    private struct OldCluster(Qcow2Image image, long clusterGuest, ulong entry, ulong bitmap) : IDisposable
    {
        private byte[]? _decompressed;

        public readonly bool Compressed => (entry & CompressedFlag) != 0;

        public readonly long Host => Compressed ? 0 : (long)(entry & OffsetMask);

        /// <summary>Allocated subclusters (bit 0 alone without extended L2 entries).</summary>
        public readonly uint Allocated => Compressed ? 0u
            : image._extended ? (Host != 0 ? (uint)bitmap : 0u)
            : Host != 0 && (entry & ZeroFlag) == 0 ? 1u : 0u;

        public readonly uint Zero => Compressed ? 0u : image._extended ? (uint)(bitmap >> 32) : (uint)(entry & ZeroFlag);

        /// <summary>Reads bytes of subcluster <paramref name="subcluster"/> starting at <paramref name="from"/> within the cluster.</summary>
        public void Read(int subcluster, int from, Span<byte> destination)
        {
            if (Compressed)
            {
                if (_decompressed is null)
                {
                    _decompressed = ArrayPool<byte>.Shared.Rent(image._clusterSize);
                    if (!image.TryDecompress(entry, _decompressed.AsSpan(0, image._clusterSize), out var failure))
                    {
                        throw image.Corrupt(failure);
                    }
                }

                _decompressed.AsSpan(from, destination.Length).CopyTo(destination);
            }
            else if ((Allocated & (1u << subcluster)) != 0)
            {
                image._file.Read(destination, Host + from);
            }
            else if ((Zero & (1u << subcluster)) != 0)
            {
                destination.Clear();
            }
            else
            {
                image.ReadBacking(clusterGuest + from, destination);
            }
        }

        public void Dispose()
        {
            if (_decompressed is not null)
            {
                ArrayPool<byte>.Shared.Return(_decompressed);
                _decompressed = null;
            }
        }
    }
}
