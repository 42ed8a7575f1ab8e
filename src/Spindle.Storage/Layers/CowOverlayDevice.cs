using System.Buffers;
using Microsoft.Win32.SafeHandles;
using Spindle.Protocol;

namespace Spindle.Storage.Layers;

/// <summary>
/// A copy-on-write overlay (issue 14; <c>spindle serve --cow</c>, qemu-nbd's <c>-s</c>, nbd-server's
/// <c>copyonwrite</c>): the device below is only ever read, writes land in a temporary sparse file, and an allocation
/// map of fixed-size blocks says where each block's current contents are — still in the base, in the overlay file, or
/// zeroes (trimmed or zeroed here; TRIM reads back as zeroes so a client never sees the base's bytes reappear).
/// </summary>
/// <remarks>
/// The overlay file is unlinked as soon as it is opened, so it disappears when this device is disposed or the process
/// dies, whichever comes first, and nothing else can open it. Nothing written here is meant to outlive the device, so
/// FLUSH and FUA have nothing to make durable and complete at once; whole blocks trimmed or zeroed have their space in
/// the file punched out. Changes (writes, zeroes, trims) are serialised:
/// a write covering part of a block copies the rest of that block up from the base first, and two of those racing on
/// one block would lose one of them. Reads run concurrently; a block's state changes only after its data is in place.
/// </remarks>
public sealed class CowOverlayDevice : LayerDevice
{
    /// <summary>The allocation map's most entries (16 Mi, one byte each): larger bases get larger blocks.</summary>
    public const int MaxMapEntries = 1 << 24;

    private const int MinBlockShift = 12;
    private const byte FromBase = 0;
    private const byte InOverlay = 1;
    private const byte Zeroed = 2;

    private readonly SafeFileHandle _overlay;
    private readonly byte[] _map;
    private readonly int _shift;
    private readonly bool _shared;
    private readonly SemaphoreSlim _mutate = new(1, 1);

    /// <summary>Puts an overlay over <paramref name="baseDevice"/>, with its file in <paramref name="directory"/>.</summary>
    /// <param name="baseDevice">The device below; it is only read.</param>
    /// <param name="directory">Where the temporary overlay file goes; null: the system's temporary directory ($TMPDIR).</param>
    /// <param name="ownsBase">Dispose the base with the overlay.</param>
    /// <param name="shared">
    /// True when every connection uses this one overlay, so a FLUSH on one covers all (multi-conn may be advertised);
    /// false for an overlay private to one connection.
    /// </param>
    /// <exception cref="IOException">The overlay file cannot be created.</exception>
    public CowOverlayDevice(BlockDevice baseDevice, string? directory, bool ownsBase, bool shared = true)
        : base(baseDevice, ownsBase)
    {
        _shared = shared;
        _shift = BlockShiftFor(baseDevice.Size);
        var blocks = (baseDevice.Size + BlockSize - 1) >> _shift;
        _map = new byte[blocks];
        var path = System.IO.Path.Combine(directory ?? System.IO.Path.GetTempPath(), $"spindle-cow-{Environment.ProcessId}-{Guid.NewGuid():N}.overlay");
        _overlay = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
        try
        {
            // Unlinked at once: the open handle keeps it, and it goes away with the handle or the process.
            File.Delete(path);
            RandomAccess.SetLength(_overlay, baseDevice.Size);
        }
        catch
        {
            _overlay.Dispose();
            throw;
        }
    }

    /// <summary>The allocation map's block size: 4 KiB, or more for a base too large for the map at 4 KiB.</summary>
    public int BlockSize => 1 << _shift;

    public override BlockDeviceFeatures Features =>
        BlockDeviceFeatures.Write | BlockDeviceFeatures.Flush | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
        BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero | BlockDeviceFeatures.Cache | BlockDeviceFeatures.Extents |
        (Inner.Features & BlockDeviceFeatures.Rotational) | (_shared ? BlockDeviceFeatures.SharedCache : BlockDeviceFeatures.None);

    public override string Description => $"copy-on-write overlay on {Inner.Description}";

    /// <summary>The base's other contexts (a dirty bitmap, allocation depth) no longer describe what is read here.</summary>
    public override IReadOnlyList<MetaContextSource> MetaContexts => [];

    /// <summary>The map block shift for a base of <paramref name="size"/> bytes.</summary>
    public static int BlockShiftFor(long size)
    {
        var shift = MinBlockShift;
        while (((size + (1L << shift) - 1) >> shift) > MaxMapEntries)
        {
            shift++;
        }

        return shift;
    }

    public override async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var done = 0;
        while (done < destination.Length)
        {
            var at = offset + done;
            var state = StateAt(at);
            var run = (int)RunLength(at, destination.Length - done, state);
            var slice = destination.Slice(done, run);
            switch (state)
            {
                case InOverlay:
                    ReadOverlay(at, slice.Span);
                    break;
                case Zeroed:
                    slice.Span.Clear();
                    break;
                case FromBase:
                default:
                    await Inner.ReadAsync(at, slice, cancellationToken).ConfigureAwait(false);
                    break;
            }

            done += run;
        }
    }

    public override async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        await _mutate.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await WriteLockedAsync(offset, source, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _mutate.Release();
        }
    }

    /// <summary>
    /// A read the connection's thread can do at once (as <see cref="FileBlockDevice.TryReadImmediate"/>): every piece
    /// is zeroes, in the page cache of the overlay file, or one the base can read at once; otherwise the server reads
    /// on a pool thread through <see cref="ReadAsync"/>, which starts again from the beginning.
    /// </summary>
    public override bool TryReadImmediate(long offset, Span<byte> destination)
    {
        var done = 0;
        while (done < destination.Length)
        {
            var at = offset + done;
            var state = StateAt(at);
            var run = (int)RunLength(at, destination.Length - done, state);
            var slice = destination.Slice(done, run);
            switch (state)
            {
                case InOverlay:
                    if (Native.LinuxFile.Read(_overlay, slice, at, Native.LinuxFile.RwfNowait) != run)
                    {
                        return false;
                    }

                    break;
                case Zeroed:
                    slice.Clear();
                    break;
                case FromBase:
                default:
                    if (!Inner.TryReadImmediate(at, slice))
                    {
                        return false;
                    }

                    break;
            }

            done += run;
        }

        return true;
    }

    /// <summary>
    /// A write the connection's thread can do at once: nobody else is changing the overlay, and every block it touches
    /// is covered whole or already in the overlay, so no block has to be copied up from the base first. It is a
    /// buffered write to the overlay file, as <see cref="FileBlockDevice.TryWriteImmediate"/> is to an image.
    /// </summary>
    public override bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source)
    {
        if (source.IsEmpty || !_mutate.Wait(0))
        {
            return false;
        }

        try
        {
            var end = offset + source.Length;
            var first = offset >> _shift;
            var last = (end - 1) >> _shift;
            if ((offset & (BlockSize - 1)) != 0 && _map[first] != InOverlay)
            {
                return false;
            }

            if (end != Size && (end & (BlockSize - 1)) != 0 && _map[last] != InOverlay)
            {
                return false;
            }

            RandomAccess.Write(_overlay, source, offset);
            for (var block = first; block <= last; block++)
            {
                Volatile.Write(ref _map[block], InOverlay);
            }

            return true;
        }
        finally
        {
            _mutate.Release();
        }
    }

    /// <summary>Nothing here outlives the device, so there is nothing to make durable.</summary>
    public override ValueTask FlushAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    /// <summary>A trimmed range reads as zeroes afterwards (never the base's bytes again).</summary>
    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        ZeroAsync(offset, length, cancellationToken);

    /// <summary>Zeroing whole blocks is a map update, so <see cref="ZeroFlags.FastOnly"/> is always honoured.</summary>
    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        ZeroAsync(offset, length, cancellationToken);

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    /// <summary>
    /// Blocks written here are data, zeroed ones holes that read as zeroes, and the base describes the rest
    /// (base:allocation of the combination).
    /// </summary>
    public override async ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        var baseReports = (Inner.Features & BlockDeviceFeatures.Extents) != 0;
        var position = offset;
        var end = offset + length;
        while (position < end)
        {
            var state = StateAt(position);
            var run = RunLength(position, end - position, state);
            switch (state)
            {
                case InOverlay:
                    if (!extents.Add(run, AllocationFlags.Data))
                    {
                        return;
                    }

                    break;
                case Zeroed:
                    if (!extents.Add(run, AllocationFlags.Hole | AllocationFlags.Zero))
                    {
                        return;
                    }

                    break;
                default:
                    if (!baseReports)
                    {
                        if (!extents.Add(run, AllocationFlags.Data))
                        {
                            return;
                        }

                        break;
                    }

                    var before = extents.TotalLength;
                    await Inner.GetExtentsAsync(position, run, extents, cancellationToken).ConfigureAwait(false);
                    if (extents.TotalLength - before < run)
                    {
                        return; // the base stopped early (its list is full): so does the answer
                    }

                    break;
            }

            position += run;
        }
    }

    protected override async ValueTask DisposeAsyncCore()
    {
        _overlay.Dispose();
        _mutate.Dispose();
        await base.DisposeAsyncCore().ConfigureAwait(false);
    }

    private byte StateAt(long offset) => Volatile.Read(ref _map[offset >> _shift]);

    /// <summary>How many bytes from <paramref name="offset"/> (at most <paramref name="limit"/>) share <paramref name="state"/>.</summary>
    private long RunLength(long offset, long limit, byte state)
    {
        var block = offset >> _shift;
        var run = Math.Min(limit, ((block + 1) << _shift) - offset);
        while (run < limit && Volatile.Read(ref _map[++block]) == state)
        {
            run = Math.Min(limit, run + BlockSize);
        }

        return run;
    }

    private void ReadOverlay(long offset, Span<byte> destination)
    {
        while (destination.Length > 0)
        {
            var read = RandomAccess.Read(_overlay, destination, offset);
            if (read == 0)
            {
                throw new BlockDeviceException(NbdError.IO, "the copy-on-write overlay file ended early");
            }

            destination = destination[read..];
            offset += read;
        }
    }

    /// <summary>
    /// Writes through the map: whole blocks, and parts of blocks already in the overlay, go straight to the file
    /// (contiguous ones in one write); a part of a block still in the base or zeroed is merged into a copy of that
    /// block first. Callers hold <see cref="_mutate"/>.
    /// </summary>
    private async ValueTask WriteLockedAsync(long offset, ReadOnlyMemory<byte> source, CancellationToken cancellationToken)
    {
        var end = offset + source.Length;
        var first = offset >> _shift;
        var last = (end - 1) >> _shift;
        var runStart = -1L;
        var runEnd = -1L;
        for (var block = first; block <= last; block++)
        {
            var blockStart = block << _shift;
            var blockEnd = Math.Min(blockStart + BlockSize, Size);
            var segmentStart = Math.Max(offset, blockStart);
            var segmentEnd = Math.Min(end, blockEnd);
            var whole = segmentStart == blockStart && segmentEnd == blockEnd;
            if (whole || _map[block] == InOverlay)
            {
                if (runStart < 0)
                {
                    runStart = segmentStart;
                }

                runEnd = segmentEnd;
                continue;
            }

            if (runStart >= 0)
            {
                RandomAccess.Write(_overlay, source.Span[(int)(runStart - offset)..(int)(runEnd - offset)], runStart);
                runStart = -1;
            }

            await CopyUpAsync(block, blockStart, blockEnd, source.Slice((int)(segmentStart - offset), (int)(segmentEnd - segmentStart)), segmentStart, cancellationToken).ConfigureAwait(false);
        }

        if (runStart >= 0)
        {
            RandomAccess.Write(_overlay, source.Span[(int)(runStart - offset)..(int)(runEnd - offset)], runStart);
        }

        // Only now that every byte is in the file may readers be sent there.
        for (var block = first; block <= last; block++)
        {
            Volatile.Write(ref _map[block], InOverlay);
        }
    }

    private async ValueTask CopyUpAsync(long block, long blockStart, long blockEnd, ReadOnlyMemory<byte> part, long partOffset, CancellationToken cancellationToken)
    {
        var length = (int)(blockEnd - blockStart);
        var buffer = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            var whole = buffer.AsMemory(0, length);
            if (_map[block] == Zeroed)
            {
                whole.Span.Clear();
            }
            else
            {
                await Inner.ReadAsync(blockStart, whole, cancellationToken).ConfigureAwait(false);
            }

            part.Span.CopyTo(whole.Span[(int)(partOffset - blockStart)..]);
            RandomAccess.Write(_overlay, whole.Span, blockStart);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    private async ValueTask ZeroAsync(long offset, long length, CancellationToken cancellationToken)
    {
        await _mutate.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            var end = offset + length;
            for (var block = offset >> _shift; block <= (end - 1) >> _shift; block++)
            {
                var blockStart = block << _shift;
                var blockEnd = Math.Min(blockStart + BlockSize, Size);
                var segmentStart = Math.Max(offset, blockStart);
                var segmentEnd = Math.Min(end, blockEnd);
                if (segmentStart == blockStart && segmentEnd == blockEnd)
                {
                    Volatile.Write(ref _map[block], Zeroed);
                }
                else if (_map[block] != Zeroed)
                {
                    // Part of a block: written as zeroes, through the copy-up path.
                    var zeroes = ArrayPool<byte>.Shared.Rent((int)(segmentEnd - segmentStart));
                    try
                    {
                        var part = zeroes.AsMemory(0, (int)(segmentEnd - segmentStart));
                        part.Span.Clear();
                        await WriteLockedAsync(segmentStart, part, cancellationToken).ConfigureAwait(false);
                    }
                    finally
                    {
                        ArrayPool<byte>.Shared.Return(zeroes);
                    }
                }
            }

            // The whole blocks now read as zeroes from the map; give their old bytes' space back (best effort: a
            // file system without hole punching only keeps the space until the overlay goes).
            var wholeStart = ((offset + BlockSize - 1) >> _shift) << _shift;
            var wholeEnd = end == Size ? Size : (end >> _shift) << _shift;
            if (wholeEnd > wholeStart)
            {
                _ = Native.LinuxFile.Allocate(_overlay, Native.LinuxFile.FallocPunchHole | Native.LinuxFile.FallocKeepSize, wholeStart, wholeEnd - wholeStart);
            }
        }
        finally
        {
            _mutate.Release();
        }
    }
}
