using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Storage.Qcow2;

/// <summary>What a run of guest bytes maps to.</summary>
internal enum RunKind : byte
{
    /// <summary>Not allocated in this image: read from the backing file, or zeroes.</summary>
    Unallocated,

    /// <summary>A zero cluster or subcluster (v3 zero flag, or the extended L2 "reads as zeros" bit).</summary>
    Zero,

    /// <summary>A standard cluster: the bytes are at <see cref="Run.Host"/>.</summary>
    Data,

    /// <summary>A compressed cluster (never longer than one cluster).</summary>
    Compressed,
}

/// <summary>A run of guest bytes with one kind and, for data, contiguous host bytes.</summary>
internal struct Run
{
    public RunKind Kind;

    /// <summary>Data only: every cluster of the run has refcount 1 (L2 bit 63), so it may be written in place.</summary>
    public bool Copied;

    /// <summary>Data: the host offset of the run's first byte.</summary>
    public long Host;

    /// <summary>Compressed: the L2 entry (the compressed cluster descriptor).</summary>
    public ulong Entry;

    public long Length;
}

public sealed partial class Qcow2Image
{
    private byte[]? _tableBuffer;

    private int L2EntryMask => (1 << _l2Bits) - 1;

    /// <summary>
    /// Describes the guest bytes from <paramref name="guest"/> (at most <paramref name="maxLength"/>, never past one L2
    /// table's reach). Caller holds <see cref="_meta"/>.
    /// </summary>
    private Run MapRunLocked(long guest, long maxLength)
    {
        var cluster = guest >> _clusterBits;
        var l1Index = cluster >> _l2Bits;
        var tableReach = (long)_clusterSize << _l2Bits;
        var limit = Math.Min(guest + maxLength, (l1Index + 1) * tableReach);
        if (l1Index >= _l1.Length)
        {
            return new Run { Kind = RunKind.Unallocated, Length = limit - guest };
        }

        var l2Offset = (long)(_l1[l1Index] & OffsetMask);
        if (l2Offset == 0)
        {
            return new Run { Kind = RunKind.Unallocated, Length = limit - guest };
        }

        var table = GetL2Locked(l2Offset);
        var run = Classify(table, (int)(cluster & L2EntryMask), guest);
        if (run.Kind == RunKind.Compressed)
        {
            run.Length = Math.Min((guest | _clusterMask) + 1, limit) - guest;
            return run;
        }

        var position = Math.Min(((guest >> _subclusterBits) + 1) << _subclusterBits, limit);
        while (position < limit)
        {
            var next = Classify(table, (int)((position >> _clusterBits) & L2EntryMask), position);
            if (next.Kind != run.Kind || next.Copied != run.Copied || (run.Kind == RunKind.Data && next.Host != run.Host + (position - guest)))
            {
                break;
            }

            position = Math.Min(((position >> _subclusterBits) + 1) << _subclusterBits, limit);
        }

        run.Length = position - guest;
        return run;
    }

    /// <summary>Classifies the (sub)cluster holding <paramref name="guest"/> (qcow2.txt "L2 table entry", "Extended L2 Entries").</summary>
    private Run Classify(ulong[] table, int index, long guest)
    {
        var entry = _extended ? table[index * 2] : table[index];
        if ((entry & CompressedFlag) != 0)
        {
            CheckCompressed(entry);
            return new Run { Kind = RunKind.Compressed, Entry = entry };
        }

        var host = (long)(entry & OffsetMask);
        if (!_extended)
        {
            if ((entry & ZeroFlag) != 0)
            {
                return new Run { Kind = RunKind.Zero };
            }

            if (host == 0)
            {
                return new Run { Kind = RunKind.Unallocated };
            }
        }
        else
        {
            var bitmap = table[(index * 2) + 1];
            var subcluster = (int)((guest >> _subclusterBits) & 31);
            var allocated = ((bitmap >> subcluster) & 1) != 0;
            var zero = ((bitmap >> (32 + subcluster)) & 1) != 0;
            if (allocated && zero)
            {
                throw Corrupt($"the L2 entry of guest offset {guest} marks subcluster {subcluster} both allocated and zero");
            }

            if (zero)
            {
                return new Run { Kind = RunKind.Zero };
            }

            if (!allocated)
            {
                return new Run { Kind = RunKind.Unallocated };
            }

            if (host == 0)
            {
                throw Corrupt($"the L2 entry of guest offset {guest} has allocated subclusters but no host cluster");
            }
        }

        if ((host & _clusterMask) != 0)
        {
            throw Corrupt($"the L2 entry of guest offset {guest} points at a misaligned host offset 0x{host:x}");
        }

        if (host >= _file.Length)
        {
            throw Corrupt($"the L2 entry of guest offset {guest} points at 0x{host:x}, past the end of the file");
        }

        return new Run { Kind = RunKind.Data, Host = host + (guest & _clusterMask), Copied = (entry & CopiedFlag) != 0 };
    }

    /// <summary>Splits a compressed cluster descriptor: host offset and byte length of the compressed data.</summary>
    private (long Offset, int Length) CompressedRange(ulong entry)
    {
        // qcow2.txt "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8); bits 0..x-1 offset, x..61 sectors.
        var x = 62 - (_clusterBits - 8);
        var offset = (long)(entry & ((1UL << x) - 1));
        var sectors = (long)((entry >> x) & ((1UL << (_clusterBits - 8)) - 1)) + 1;
        return (offset, (int)((sectors * 512) - (offset & 511)));
    }

    private void CheckCompressed(ulong entry)
    {
        var (offset, _) = CompressedRange(entry);
        if (offset >= 1L << 56 || offset >= _file.Length || offset < _clusterSize)
        {
            throw Corrupt($"a compressed cluster descriptor points at 0x{offset:x}, outside the file");
        }
    }

    /// <summary>The L2 table at <paramref name="offset"/>, from the cache or the file. Caller holds <see cref="_meta"/>.</summary>
    private ulong[] GetL2Locked(long offset)
    {
        if (_l2Cache.TryGet(offset, out var table))
        {
            return table;
        }

        if ((offset & _clusterMask) != 0 || offset < _clusterSize || offset > _file.Length - _clusterSize)
        {
            throw Corrupt($"the L2 table offset 0x{offset:x} is misaligned or outside the file");
        }

        table = new ulong[_clusterSize / 8];
        var buffer = _tableBuffer ??= new byte[_clusterSize];
        _file.Read(buffer, offset);
        for (var i = 0; i < table.Length; i++)
        {
            table[i] = BinaryPrimitives.ReadUInt64BigEndian(buffer.AsSpan(i * 8));
        }

        _l2Cache.Add(offset, table, dirty: false);
        return table;
    }

    private void WriteTable(long offset, ulong[] table)
    {
        var buffer = _tableBuffer ??= new byte[_clusterSize];
        for (var i = 0; i < table.Length; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(buffer.AsSpan(i * 8), table[i]);
        }

        _file.Write(buffer.AsSpan(0, table.Length * 8), offset);
    }

    /// <summary>
    /// Records that the image is corrupt: writes are refused from now on and, for a writable version 3 image, the
    /// corrupt bit is set on disk as qemu does. Returns the EIO to throw for the request that found it.
    /// </summary>
    private BlockDeviceException Corrupt(string message)
    {
        if (!_corrupt)
        {
            _corrupt = true;
            if (!_readOnly && _header.Version >= 3)
            {
                try
                {
                    Span<byte> field = stackalloc byte[8];
                    _file.Read(field, Qcow2Header.OffsetIncompatibleFeatures);
                    BinaryPrimitives.WriteUInt64BigEndian(field, BinaryPrimitives.ReadUInt64BigEndian(field) | Qcow2Header.IncompatibleCorrupt);
                    _file.Write(field, Qcow2Header.OffsetIncompatibleFeatures);
                    _file.Sync();
                }
                catch (BlockDeviceException)
                {
                    // The image is corrupt either way; the request still gets its EIO.
                }
            }
        }

        return new BlockDeviceException(NbdError.IO, $"{Description} is corrupt: {message}");
    }
}
