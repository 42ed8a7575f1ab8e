using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Threading.Channels;

namespace Spindle.Cli.Commands;

/// <summary>How <see cref="CopyEngine"/> copies. Each default is stated on its property.</summary>
internal sealed class CopySettings
{
    /// <summary>Bytes per READ/WRITE. Default: 256 KiB (nbdcopy's), lowered to what both ends accept.</summary>
    public int RequestSize { get; set; } = 256 * 1024;

    /// <summary>
    /// Requests in flight per connection, or null for <see cref="TotalRequests"/> spread over the connections.
    /// Default: null.
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

    /// <summary>Trust that the destination already reads as zeroes. Default: false (true for a file the copy creates).</summary>
    public bool DestinationIsZero { get; set; }

    /// <summary>Flush the destination at the end. Default: true.</summary>
    public bool Flush { get; set; } = true;

    /// <summary>Zero runs are sent in requests of at most this many bytes. Default: 1 GiB.</summary>
    public long MaxZeroRequest { get; set; } = 1L << 30;
}

/// <summary>What a copy did.</summary>
internal sealed record CopyResult(long Size, TimeSpan Elapsed, long DataBytes, long ZeroedBytes, long SkippedBytes, int Workers, int RequestSize)
{
    public double BytesPerSecond => Elapsed.TotalSeconds > 0 ? Size / Elapsed.TotalSeconds : 0;
}

/// <summary>
/// Copies one endpoint onto another with many requests in flight, out of order: a producer turns the source's
/// allocation (block status, SEEK_DATA) into work items, and workers read and write them, each with one buffer of
/// its own for the whole copy. Ranges known to be zero are never read; ranges read as zero (zero detection) are
/// not written: the destination gets WRITE_ZEROES (or fallocate), or nothing at all if it is already zero.
/// </summary>
internal sealed class CopyEngine(CopyEndpoint source, CopyEndpoint destination, CopySettings settings)
{
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
            throw new IOException($"the destination {destination.Name} ({destination.Size} bytes) is smaller than the source {source.Name} ({size} bytes)");
        }

        var alignment = Math.Max(source.MinimumBlockSize, destination.MinimumBlockSize);
        var maxRequest = Math.Min(source.MaxRequestSize, destination.MaxRequestSize);
        var requestSize = Math.Clamp(settings.RequestSize, alignment, maxRequest) / alignment * alignment;
        var sparse = settings.SparseSize <= 0 || settings.Allocated ? 0 : RoundUp(Math.Max(settings.SparseSize, destination.MinimumBlockSize), alignment);
        var destinationIsZero = !settings.Allocated && (settings.DestinationIsZero || destination.IsZero);
        var connections = new[] { source.Connections, destination.Connections }.Where(c => c is not null).Select(c => c!.Value).DefaultIfEmpty(settings.Connections).Min();
        var workers = settings.RequestsPerConnection is { } perConnection ? connections * perConnection : settings.TotalRequests;

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

        if (settings.Flush)
        {
            await destination.FlushAsync(cancellationToken).ConfigureAwait(false);
        }

        watch.Stop();
        return new CopyResult(size, watch.Elapsed, _dataBytes, _zeroedBytes, _skippedBytes, workers, requestSize);
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
            async ValueTask EmitData(long end, bool all)
            {
                while (end - dataStart >= requestSize || (all && end > dataStart))
                {
                    var length = Math.Min(requestSize, end - dataStart);
                    await writer.WriteAsync(new SourceRun(dataStart, length, false), cancellationToken).ConfigureAwait(false);
                    dataStart += length;
                }
            }

            var runs = settings.UseExtents ? source.GetRunsAsync(0, size, cancellationToken) : WholeAsData(size);
            await foreach (var run in runs.ConfigureAwait(false))
            {
                var end = Math.Min(run.Offset + run.Length, size);
                if (run.Zero)
                {
                    var zeroStart = RoundUp(run.Offset, alignment);
                    var zeroEnd = end == size ? end : end / alignment * alignment;
                    if (zeroStart < zeroEnd)
                    {
                        dataEnd = zeroStart;
                        await EmitData(dataEnd, all: true).ConfigureAwait(false);
                        var chunk = destinationIsZero || destination.CanZero ? settings.MaxZeroRequest : requestSize;
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

            // Whatever the runs did not describe (a server that stopped early is asked again by the client) is data.
            await EmitData(size, all: true).ConfigureAwait(false);
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
                        await destination.WriteAsync(item.Offset, data, cancellationToken).ConfigureAwait(false);
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
                await destination.WriteAsync(offset + position, data[position..runEnd], cancellationToken).ConfigureAwait(false);
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

        if (await destination.TryZeroAsync(offset, length, settings.Allocated, cancellationToken).ConfigureAwait(false))
        {
            Interlocked.Add(ref _zeroedBytes, length);
            return;
        }

        // No cheap way to zero: write zeroes as data, from one shared read-only buffer.
        for (var position = offset; position < offset + length; position += zeroes.Length)
        {
            var count = (int)Math.Min(zeroes.Length, offset + length - position);
            await destination.WriteAsync(position, zeroes.Memory[..count], cancellationToken).ConfigureAwait(false);
        }

        Interlocked.Add(ref _dataBytes, length);
    }

    private static async IAsyncEnumerable<SourceRun> WholeAsData(long size)
    {
        await Task.CompletedTask.ConfigureAwait(false);
        yield return new SourceRun(0, size, false);
    }

    private static long RoundUp(long value, long alignment) => (value + alignment - 1) / alignment * alignment;

    private static int RoundUp(int value, int alignment) => (value + alignment - 1) / alignment * alignment;

    private sealed class ZeroSource(int length)
    {
        public int Length => length;

        public ReadOnlyMemory<byte> Memory { get; } = new byte[length];
    }
}
