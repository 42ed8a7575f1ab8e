using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Threading.Channels;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>How <see cref="CopyEngine"/> copies. Each default is stated on its property.</summary>
internal sealed record CopySettings
{
    /// <summary>Bytes per READ/WRITE. Default: 256 KiB (nbdcopy's), lowered to what both ends accept.</summary>
    public int RequestSize { get; set; } = 256 * 1024;

    /// <summary>
    /// Requests in flight per connection, or null for <see cref="TotalRequests"/> spread over the connections.
    /// Either way no more are in flight than an end's <see cref="BlockDevice.QueueDepth"/>. Default: null.
    /// </summary>
    public int? RequestsPerConnection { get; set; }

    /// <summary>
    /// Requests in flight in all, when <see cref="RequestsPerConnection"/> is not set: 64 (16 MiB of 256 KiB
    /// buffers, nbdcopy's queue size). More buffers only cost memory and page faults once the sockets are full.
    /// </summary>
    public int TotalRequests { get; set; } = 64;

    /// <summary>How long a lost NBD end may take to come back (null: the client library's default).</summary>
    public TimeSpan? DeadTimeout { get; set; }

    /// <summary>Connections to each NBD end when it advertises multi-conn. Default: 4.</summary>
    public int Connections { get; set; } = 4;

    /// <summary>Zero detection granularity: blocks of this many zero bytes are not written. 0 turns detection off. Default: 4096.</summary>
    public int SparseSize { get; set; } = 4096;

    /// <summary>Ask the source which ranges are holes or zeroes (block status, SEEK_DATA). Default: true.</summary>
    public bool UseExtents { get; set; } = true;

    /// <summary>Make the destination fully allocated: zeroes are written with NO_HOLE, never skipped. Default: false.</summary>
    public bool Allocated { get; set; }

    /// <summary>
    /// The destination already reads as zeroes, so zero ranges are skipped: the user said so, or the copy has just
    /// created or emptied the destination file. Default: false.
    /// </summary>
    public bool DestinationIsZero { get; set; }

    /// <summary>Flush the destination at the end. Default: true.</summary>
    public bool Flush { get; set; } = true;

    /// <summary>Zero runs are sent in requests of at most this many bytes. Default: 1 GiB.</summary>
    public long MaxZeroRequest { get; set; } = 1L << 30;

    /// <summary>
    /// Copy only these ranges of the source (in order, not overlapping: the dirty ranges of a bitmap); everything
    /// else on the destination is left as it is. Default: null, the whole source.
    /// </summary>
    public IReadOnlyList<ByteRange>? Ranges { get; set; }
}

/// <summary>A range of bytes: [<see cref="Offset"/>, <see cref="End"/>).</summary>
internal readonly record struct ByteRange(long Offset, long Length)
{
    public long End => Offset + Length;
}

/// <summary>A run of the source: data to copy, or bytes known to read as zeroes.</summary>
internal readonly record struct SourceRun(long Offset, long Length, bool Zero);

/// <summary>What a copy did.</summary>
/// <remarks>
/// <see cref="Size"/> is what was dealt with: the whole source, or with <see cref="CopySettings.Ranges"/> the ranges
/// once rounded out to the block size both ends accept.
/// </remarks>
internal sealed record CopyResult(long Size, TimeSpan Elapsed, long DataBytes, long ZeroedBytes, long SkippedBytes, int Workers, int RequestSize)
{
    public double BytesPerSecond => Elapsed.TotalSeconds > 0 ? Size / Elapsed.TotalSeconds : 0;
}

/// <summary>
/// Copies one <see cref="BlockDevice"/> onto another with many requests in flight, out of order: a producer turns the
/// source's allocation (<see cref="BlockDevice.GetExtentsAsync"/>: block status, SEEK_DATA) into work items, and
/// workers read and write them, each with one buffer of its own for the whole copy. Ranges known to be zero are never
/// read; ranges read as zero (zero detection) are not written: the destination gets WRITE_ZEROES (or fallocate), or
/// nothing at all if it is already zero.
/// </summary>
/// <remarks>
/// What the ends ask for comes from the devices: requests aligned to both minimum block sizes and no larger than
/// both maximums (<see cref="BlockDevice.BlockSizes"/>), no more in flight than either's
/// <see cref="BlockDevice.QueueDepth"/>, no more writes at once than the destination's
/// <see cref="BlockDevice.MaxConcurrentWrites"/>, zeroing through WRITE_ZEROES only where the destination declares
/// it, and a flush at the end only where it declares one.
/// </remarks>
internal sealed partial class CopyEngine(BlockDevice source, BlockDevice destination, CopySettings settings)
{
    /// <summary>Extents asked for at once; a source answers for as much of the rest as fits.</summary>
    private const int ExtentBatch = 4096;

    private readonly bool _canZero = (destination.Features & BlockDeviceFeatures.WriteZeroes) != 0;
    private SemaphoreSlim? _writers;
    private long _dataBytes;
    private long _zeroedBytes;
    private long _skippedBytes;
    private long _doneBytes;

    /// <summary>Bytes of the source dealt with so far (for a progress bar).</summary>
    public long DoneBytes => Interlocked.Read(ref _doneBytes);

    public async Task<CopyResult> RunAsync(CancellationToken cancellationToken)
    {
        var size = source.Size;
        if (destination.Size < size)
        {
            throw new IOException($"the destination {destination.Description} ({destination.Size} bytes) is smaller than the source {source.Description} ({size} bytes)");
        }

        var sourceSizes = source.BlockSizes ?? BlockSizeConstraints.Default;
        var destinationSizes = destination.BlockSizes ?? BlockSizeConstraints.Default;
        var alignment = Alignment;
        var maxRequest = (int)Math.Min(Math.Min(sourceSizes.Maximum, destinationSizes.Maximum), int.MaxValue);
        var requestSize = Math.Clamp(settings.RequestSize, alignment, Math.Max(alignment, maxRequest)) / alignment * alignment;
        var sparse = settings.SparseSize <= 0 || settings.Allocated ? 0 : RoundUp(Math.Max(settings.SparseSize, (int)destinationSizes.Minimum), alignment);
        var destinationIsZero = !settings.Allocated && settings.DestinationIsZero;
        var wanted = settings.RequestsPerConnection is { } perConnection ? settings.Connections * perConnection : settings.TotalRequests;
        var workers = Math.Max(1, Math.Min(wanted, Math.Min(source.QueueDepth ?? int.MaxValue, destination.QueueDepth ?? int.MaxValue)));
        using var writers = destination.MaxConcurrentWrites is { } writeLimit && writeLimit < workers ? new SemaphoreSlim(Math.Max(1, writeLimit)) : null;
        _writers = writers;

        var zeroBuffer = new ZeroSource(requestSize);
        var watch = Stopwatch.StartNew();
        using var failed = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var work = Channel.CreateBounded<SourceRun>(new BoundedChannelOptions(workers * 2) { SingleWriter = true, FullMode = BoundedChannelFullMode.Wait });
        var producer = ProduceAsync(work.Writer, size, alignment, requestSize, destinationIsZero, failed.Token);
        var tasks = new List<Task>(workers + 1) { producer };
        for (var i = 0; i < workers; i++)
        {
            tasks.Add(WorkAsync(work.Reader, requestSize, sparse, destinationIsZero, zeroBuffer, failed.Token));
        }

        // The first failure stops everyone; report it rather than the cancellations it caused.
        var failure = await WhenAllOrFirstFailure(tasks, failed).ConfigureAwait(false);
        if (failure is not null)
        {
            throw failure;
        }

        if (settings.Flush && (destination.Features & BlockDeviceFeatures.Flush) != 0)
        {
            await destination.FlushAsync(cancellationToken).ConfigureAwait(false);
        }

        watch.Stop();
        return new CopyResult(TotalBytes, watch.Elapsed, _dataBytes, _zeroedBytes, _skippedBytes, workers, requestSize);
    }

    private static async Task<Exception?> WhenAllOrFirstFailure(List<Task> tasks, CancellationTokenSource failed)
    {
        Exception? first = null;
        var remaining = new HashSet<Task>(tasks);
        while (remaining.Count > 0)
        {
            var done = await Task.WhenAny(remaining).ConfigureAwait(false);
            remaining.Remove(done);
            if (done.IsFaulted && first is null)
            {
                first = done.Exception!.InnerException ?? done.Exception;
                await failed.CancelAsync().ConfigureAwait(false);
            }
            else if (done.IsCanceled && first is null && !failed.IsCancellationRequested)
            {
                first = new OperationCanceledException();
            }
        }

        return first;
    }

    /// <summary>
    /// Turns the source's runs into aligned work: zero runs shrink inward to the alignment (their edges are copied as
    /// data), data runs are cut into requests.
    /// </summary>
    private async Task ProduceAsync(ChannelWriter<SourceRun> writer, long size, int alignment, int requestSize, bool destinationIsZero, CancellationToken cancellationToken)
    {
        try
        {
            long dataStart = 0;
            long dataEnd = 0;
            long previousEnd = 0;
            async ValueTask EmitData(long end, bool all)
            {
                while (end - dataStart >= requestSize || (all && end > dataStart))
                {
                    var length = Math.Min(requestSize, end - dataStart);
                    await writer.WriteAsync(new SourceRun(dataStart, length, false), cancellationToken).ConfigureAwait(false);
                    dataStart += length;
                }
            }

            await foreach (var run in RunsAsync(size, cancellationToken).ConfigureAwait(false))
            {
                var end = Math.Min(run.Offset + run.Length, size);
                if (run.Offset > previousEnd)
                {
                    // A gap (only with CopySettings.Ranges, which are aligned): the data before it goes out as it is.
                    await EmitData(previousEnd, all: true).ConfigureAwait(false);
                    dataStart = dataEnd = run.Offset;
                }

                previousEnd = end;
                if (run.Zero)
                {
                    var zeroStart = RoundUp(run.Offset, alignment);
                    var zeroEnd = end == size ? end : end / alignment * alignment;
                    if (zeroStart < zeroEnd)
                    {
                        dataEnd = zeroStart;
                        await EmitData(dataEnd, all: true).ConfigureAwait(false);
                        var chunk = destinationIsZero || _canZero ? settings.MaxZeroRequest : requestSize;
                        for (var position = zeroStart; position < zeroEnd; position += chunk)
                        {
                            var length = Math.Min(chunk, zeroEnd - position);
                            await writer.WriteAsync(new SourceRun(position, length, true), cancellationToken).ConfigureAwait(false);
                        }

                        dataStart = dataEnd = zeroEnd;
                        if (zeroEnd < end)
                        {
                            dataEnd = end;
                        }

                        continue;
                    }
                }

                dataEnd = end;
                await EmitData(dataEnd, all: false).ConfigureAwait(false);
                if (end >= size)
                {
                    break;
                }
            }

            // Whatever the runs did not describe (a server that stopped early is asked again by the client) is data;
            // with ranges, the runs end where the last range does.
            await EmitData(settings.Ranges is null ? size : previousEnd, all: true).ConfigureAwait(false);
        }
        finally
        {
            writer.TryComplete();
        }
    }

    private async Task WorkAsync(ChannelReader<SourceRun> reader, int requestSize, int sparse, bool destinationIsZero, ZeroSource zeroes, CancellationToken cancellationToken)
    {
        // One buffer per worker for the whole copy: no allocation per request.
        var buffer = GC.AllocateUninitializedArray<byte>(requestSize, pinned: true);
        while (await reader.WaitToReadAsync(cancellationToken).ConfigureAwait(false))
        {
            while (reader.TryRead(out var item))
            {
                if (item.Zero)
                {
                    await ZeroAsync(item.Offset, item.Length, destinationIsZero, zeroes, cancellationToken).ConfigureAwait(false);
                }
                else
                {
                    var data = buffer.AsMemory(0, (int)item.Length);
                    await source.ReadAsync(item.Offset, data, cancellationToken).ConfigureAwait(false);
                    if (sparse == 0)
                    {
                        await WriteAsync(item.Offset, data, cancellationToken).ConfigureAwait(false);
                        Interlocked.Add(ref _dataBytes, item.Length);
                    }
                    else
                    {
                        await WriteSparseAsync(item.Offset, data, sparse, destinationIsZero, zeroes, cancellationToken).ConfigureAwait(false);
                    }
                }

                Interlocked.Add(ref _doneBytes, item.Length);
            }
        }
    }

    /// <summary>Writes the non-zero blocks of <paramref name="data"/>; runs of all-zero blocks are zeroed or skipped instead.</summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask WriteSparseAsync(long offset, Memory<byte> data, int sparse, bool destinationIsZero, ZeroSource zeroes, CancellationToken cancellationToken)
    {
        var position = 0;
        while (position < data.Length)
        {
            // A run of blocks of one kind (zero or not), the last block possibly short.
            var zero = IsZeroBlock(data.Span, position, sparse);
            var runEnd = position;
            while (runEnd < data.Length && IsZeroBlock(data.Span, runEnd, sparse) == zero)
            {
                runEnd = Math.Min(runEnd + sparse, data.Length);
            }

            if (zero)
            {
                await ZeroAsync(offset + position, runEnd - position, destinationIsZero, zeroes, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                await WriteAsync(offset + position, data[position..runEnd], cancellationToken).ConfigureAwait(false);
                Interlocked.Add(ref _dataBytes, runEnd - position);
            }

            position = runEnd;
        }
    }

    private static bool IsZeroBlock(ReadOnlySpan<byte> data, int position, int sparse) =>
        !data.Slice(position, Math.Min(sparse, data.Length - position)).ContainsAnyExcept((byte)0);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ZeroAsync(long offset, long length, bool destinationIsZero, ZeroSource zeroes, CancellationToken cancellationToken)
    {
        if (destinationIsZero)
        {
            Interlocked.Add(ref _skippedBytes, length);
            return;
        }

        if (_canZero)
        {
            await destination.WriteZeroesAsync(offset, length, settings.Allocated ? ZeroFlags.NoHole : ZeroFlags.None, cancellationToken).ConfigureAwait(false);
            Interlocked.Add(ref _zeroedBytes, length);
            return;
        }

        // No cheap way to zero: write zeroes as data, from one shared read-only buffer.
        for (var position = offset; position < offset + length; position += zeroes.Length)
        {
            var count = (int)Math.Min(zeroes.Length, offset + length - position);
            await WriteAsync(position, zeroes.Memory[..count], cancellationToken).ConfigureAwait(false);
        }

        Interlocked.Add(ref _dataBytes, length);
    }

    /// <summary>
    /// The source's allocation as runs, in order from 0: data, or known to read as zeroes. NBD_STATE_ZERO (an extent
    /// with <see cref="AllocationFlags.Zero"/>) means "reads as zeroes"; a hole without it has undefined contents and
    /// is copied as data. Without extents (not asked for, or not offered) everything is data.
    /// </summary>
    private IAsyncEnumerable<SourceRun> RunsAsync(long size, CancellationToken cancellationToken) =>
        settings.Ranges is null ? RangeRunsAsync(0, size, new ExtentList(ExtentBatch), cancellationToken) : SelectedRunsAsync(size, cancellationToken);

    /// <summary>The runs of [<paramref name="start"/>, <paramref name="end"/>), asking the source as often as it takes.</summary>
    private async IAsyncEnumerable<SourceRun> RangeRunsAsync(long start, long end, ExtentList extents, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        if (!settings.UseExtents || (source.Features & BlockDeviceFeatures.Extents) == 0)
        {
            yield return new SourceRun(start, end - start, false);
            yield break;
        }

        // Bounded: each answer describes at least one byte more, or the rest is taken as data.
        var position = start;
        while (position < end)
        {
            extents.Clear(ExtentBatch);
            await source.GetExtentsAsync(position, end - position, extents, cancellationToken).ConfigureAwait(false);
            if (extents.Count == 0)
            {
                // Nothing reported: the rest is data (always safe).
                yield return new SourceRun(position, end - position, false);
                yield break;
            }

            for (var i = 0; i < extents.Count && position < end; i++)
            {
                var extent = extents[i];
                var length = Math.Min(extent.Length, end - position);
                yield return new SourceRun(position, length, (extent.Flags & AllocationFlags.Zero) != 0);
                position += length;
            }
        }
    }

    /// <summary>A data write, held back while the destination's <see cref="BlockDevice.MaxConcurrentWrites"/> are busy.</summary>
    private ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) =>
        _writers is null ? destination.WriteAsync(offset, data, fua: false, cancellationToken) : WriteLimitedAsync(_writers, offset, data, cancellationToken);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask WriteLimitedAsync(SemaphoreSlim writers, long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        await writers.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await destination.WriteAsync(offset, data, fua: false, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            writers.Release();
        }
    }

    private static long RoundUp(long value, long alignment) => (value + alignment - 1) / alignment * alignment;

    private static int RoundUp(int value, int alignment) => (value + alignment - 1) / alignment * alignment;

    private sealed class ZeroSource(int length)
    {
        public int Length => length;

        public ReadOnlyMemory<byte> Memory { get; } = new byte[length];
    }
}
