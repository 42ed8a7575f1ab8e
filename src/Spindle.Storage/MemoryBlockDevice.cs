using Spindle.Protocol;

namespace Spindle.Storage;

/// <summary>
/// A sparse device in memory: 64 KiB chunks allocated on first non-zero write and released as soon as they hold
/// only zeroes again, so a chunk of zeroes is never stored. Holes report as HOLE|ZERO.
/// </summary>
/// <remarks>
/// Chunks live in a two-level table (4096 chunks, 256 MiB, per page) so a multi-terabyte device costs nothing
/// until written. Writers to one chunk serialise on a striped lock; readers take no lock (overlapping concurrent
/// reads and writes have undefined results in NBD anyway, and a released chunk is never reused, so a reader only
/// ever sees whole old or new bytes of a chunk that read as what was written).
/// </remarks>
public sealed class MemoryBlockDevice : BlockDevice
{
    /// <summary>The largest memory device: 16 TiB (the page table then takes 512 KiB).</summary>
    public const long MaxSize = 16L << 40;

    private const int ChunkShift = 16;
    private const int ChunkSize = 1 << ChunkShift;
    private const int PageShift = 12;
    private const int ChunksPerPage = 1 << PageShift;
    private const int LockStripes = 256;

    private readonly byte[]?[]?[] _pages;
    private readonly Lock[] _locks;
    private readonly bool _readOnly;
    private long _allocatedChunks;

    public MemoryBlockDevice(long size, bool readOnly = false)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        if (size > MaxSize)
        {
            throw new ArgumentOutOfRangeException(nameof(size), size, $"memory devices are limited to {MaxSize} bytes (16 TiB)");
        }

        Size = size;
        _readOnly = readOnly;
        var chunks = (size + ChunkSize - 1) >> ChunkShift;
        _pages = new byte[]?[]?[(chunks + ChunksPerPage - 1) >> PageShift];
        _locks = new Lock[LockStripes];
        for (var i = 0; i < _locks.Length; i++)
        {
            _locks[i] = new Lock();
        }
    }

    public override long Size { get; }

    /// <summary>Bytes of memory held by allocated chunks.</summary>
    public long AllocatedBytes => Interlocked.Read(ref _allocatedChunks) * ChunkSize;

    public override string Description => $"memory ({Size} bytes)";

    public override BlockDeviceFeatures Features =>
        BlockDeviceFeatures.Flush | BlockDeviceFeatures.Cache | BlockDeviceFeatures.Extents | BlockDeviceFeatures.SharedCache |
        (_readOnly
            ? BlockDeviceFeatures.None
            : BlockDeviceFeatures.Write | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim | BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero);

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        Read(offset, destination.Span);
        return ValueTask.CompletedTask;
    }

    private void Read(long offset, Span<byte> span)
    {
        var position = offset;
        var done = 0;
        while (done < span.Length)
        {
            var index = position >> ChunkShift;
            var within = (int)(position & (ChunkSize - 1));
            var count = Math.Min(ChunkSize - within, span.Length - done);
            var chunk = GetChunk(index);
            if (chunk is null)
            {
                span.Slice(done, count).Clear();
            }
            else
            {
                chunk.AsSpan(within, count).CopyTo(span.Slice(done, count));
            }

            done += count;
            position += count;
        }

    }

    public override bool TryReadImmediate(long offset, Span<byte> destination)
    {
        Read(offset, destination);
        return true;
    }

    public override bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source)
    {
        EnsureWritable();
        Write(offset, source);
        return true;
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        Write(offset, source.Span);
        return ValueTask.CompletedTask;
    }

    private void Write(long offset, ReadOnlySpan<byte> span)
    {
        var position = offset;
        var done = 0;
        while (done < span.Length)
        {
            var index = position >> ChunkShift;
            var within = (int)(position & (ChunkSize - 1));
            var count = Math.Min(ChunkSize - within, span.Length - done);
            var piece = span.Slice(done, count);
            var allZero = !piece.ContainsAnyExcept((byte)0);
            lock (LockFor(index))
            {
                var chunk = GetChunk(index);
                if (chunk is null)
                {
                    if (!allZero)
                    {
                        chunk = new byte[ChunkSize];
                        piece.CopyTo(chunk.AsSpan(within));
                        SetChunk(index, chunk);
                    }
                }
                else
                {
                    piece.CopyTo(chunk.AsSpan(within));
                    if (allZero)
                    {
                        ReleaseIfZero(index, chunk);
                    }
                }
            }

            done += count;
            position += count;
        }

    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        Zero(offset, length);
        return ValueTask.CompletedTask;
    }

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        EnsureWritable();

        // NO_HOLE asks that the range stay allocated, but memory has nothing to provision: a stored zero chunk would
        // only waste memory, and future writes cannot fail for lack of space either way.
        Zero(offset, length);
        return ValueTask.CompletedTask;
    }

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        var position = offset;
        var end = offset + length;
        while (position < end && !extents.IsFull)
        {
            var index = position >> ChunkShift;
            var chunkEnd = Math.Min((index + 1) << ChunkShift, end);
            if (GetPage(index) is null)
            {
                // A whole missing page is one hole; skip to its end without visiting its chunks.
                chunkEnd = Math.Min(((index >> PageShift) + 1) << (PageShift + ChunkShift), end);
                extents.Add(chunkEnd - position, AllocationFlags.Hole | AllocationFlags.Zero);
            }
            else
            {
                var flags = GetChunk(index) is null ? AllocationFlags.Hole | AllocationFlags.Zero : AllocationFlags.Data;
                extents.Add(chunkEnd - position, flags);
            }

            position = chunkEnd;
        }

        return ValueTask.CompletedTask;
    }

    private void Zero(long offset, long length)
    {
        var position = offset;
        var end = offset + length;
        while (position < end)
        {
            var index = position >> ChunkShift;
            var within = (int)(position & (ChunkSize - 1));
            var count = (int)Math.Min(ChunkSize - within, end - position);
            if (GetPage(index) is null)
            {
                // Nothing stored in this whole page: skip it.
                position = Math.Min(((index >> PageShift) + 1) << (PageShift + ChunkShift), end);
                continue;
            }

            lock (LockFor(index))
            {
                var chunk = GetChunk(index);
                if (chunk is not null)
                {
                    if (count == ChunkSize)
                    {
                        SetChunk(index, null);
                    }
                    else
                    {
                        chunk.AsSpan(within, count).Clear();
                        ReleaseIfZero(index, chunk);
                    }
                }
            }

            position += count;
        }
    }

    private void ReleaseIfZero(long index, byte[] chunk)
    {
        if (!chunk.AsSpan().ContainsAnyExcept((byte)0))
        {
            SetChunk(index, null);
        }
    }

    private byte[]?[]? GetPage(long chunkIndex) => Volatile.Read(ref _pages[chunkIndex >> PageShift]);

    private byte[]? GetChunk(long chunkIndex)
    {
        var page = GetPage(chunkIndex);
        return page is null ? null : Volatile.Read(ref page[chunkIndex & (ChunksPerPage - 1)]);
    }

    /// <summary>Stores or clears a chunk slot. The caller holds the chunk's lock.</summary>
    private void SetChunk(long chunkIndex, byte[]? chunk)
    {
        var page = GetPage(chunkIndex);
        if (page is null)
        {
            if (chunk is null)
            {
                return;
            }

            var fresh = new byte[]?[ChunksPerPage];
            page = Interlocked.CompareExchange(ref _pages[chunkIndex >> PageShift], fresh, null) ?? fresh;
        }

        ref var slot = ref page[chunkIndex & (ChunksPerPage - 1)];
        var previous = slot;
        Volatile.Write(ref slot, chunk);
        if (previous is null && chunk is not null)
        {
            Interlocked.Increment(ref _allocatedChunks);
        }
        else if (previous is not null && chunk is null)
        {
            Interlocked.Decrement(ref _allocatedChunks);
        }
    }

    private Lock LockFor(long chunkIndex) => _locks[(int)(chunkIndex & (LockStripes - 1))];

    private void EnsureWritable()
    {
        if (_readOnly)
        {
            throw new BlockDeviceException(NbdError.NotPermitted, "this memory device is read-only");
        }
    }
}
