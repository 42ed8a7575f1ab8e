using System.Diagnostics;
using System.Globalization;
using Spindle.Protocol;

namespace Spindle.Storage.Layers;

/// <summary>
/// Writes one line per request to a file (issue 14: <c>--log-requests FILE</c>; nbdkit's log filter), for seeing
/// what a client really sends: <c>TIME conn=N COMMAND offset=O length=L result=OK|ERRNO latency_us=U</c>, with the
/// time in UTC (ISO 8601) when the request completed. Each connection gets a number of its own (from 1, in the
/// order they reach transmission). The file is appended to, and flushed after every line so it can be followed.
/// </summary>
public sealed class RequestLogDevice : LayerDevice
{
    private readonly LogFile _log;
    private readonly int _connection;

    /// <param name="inner">The device below.</param>
    /// <param name="path">The log file, created or appended to.</param>
    /// <param name="ownsInner">Dispose the inner device with this one.</param>
    public RequestLogDevice(BlockDevice inner, string path, bool ownsInner)
        : this(inner, new LogFile(path), 0, ownsInner)
    {
    }

    private RequestLogDevice(BlockDevice inner, LogFile log, int connection, bool ownsInner)
        : base(inner, ownsInner)
    {
        _log = log;
        _connection = connection;
    }

    /// <summary>Every connection gets its own numbered view (over its own device below, if the layer below gives one).</summary>
    public override async ValueTask<BlockDevice> OpenConnectionAsync(CancellationToken cancellationToken)
    {
        var inner = await Inner.OpenConnectionAsync(cancellationToken).ConfigureAwait(false);
        return new RequestLogDevice(inner, _log, _log.NextConnection(), ownsInner: !ReferenceEquals(inner, Inner));
    }

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        LogAsync("READ", offset, destination.Length, Stopwatch.GetTimestamp(), Inner.ReadAsync(offset, destination, cancellationToken));

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        LogAsync(fua ? "WRITE+FUA" : "WRITE", offset, source.Length, Stopwatch.GetTimestamp(), Inner.WriteAsync(offset, source, fua, cancellationToken));

    public override ValueTask FlushAsync(CancellationToken cancellationToken) =>
        LogAsync("FLUSH", 0, 0, Stopwatch.GetTimestamp(), Inner.FlushAsync(cancellationToken));

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        LogAsync("TRIM", offset, length, Stopwatch.GetTimestamp(), Inner.TrimAsync(offset, length, fua, cancellationToken));

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        LogAsync("WRITE_ZEROES", offset, length, Stopwatch.GetTimestamp(), Inner.WriteZeroesAsync(offset, length, flags, cancellationToken));

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken) =>
        LogAsync("CACHE", offset, length, Stopwatch.GetTimestamp(), Inner.CacheAsync(offset, length, cancellationToken));

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        LogAsync("BLOCK_STATUS", offset, length, Stopwatch.GetTimestamp(), Inner.GetExtentsAsync(offset, length, extents, cancellationToken));

    protected override async ValueTask DisposeAsyncCore()
    {
        if (_connection == 0)
        {
            _log.Dispose(); // the export's device, disposed last, closes the file
        }

        await base.DisposeAsyncCore().ConfigureAwait(false);
    }

    /// <summary>Awaits <paramref name="operation"/> and writes its line, failed or not.</summary>
    /// <remarks><paramref name="started"/> is taken before the operation starts (arguments are evaluated in order).</remarks>
    private async ValueTask LogAsync(string command, long offset, long length, long started, ValueTask operation)
    {
        var result = "OK";
        try
        {
            await operation.ConfigureAwait(false);
        }
        catch (BlockDeviceException exception)
        {
            result = exception.Error.ToErrnoName();
            throw;
        }
        catch (Exception exception) when (exception is IOException or OperationCanceledException)
        {
            result = exception is IOException ? "EIO" : "CANCELLED";
            throw;
        }
        finally
        {
            var latency = (long)Stopwatch.GetElapsedTime(started).TotalMicroseconds;
            _log.Write(string.Create(CultureInfo.InvariantCulture, $"{DateTime.UtcNow:yyyy-MM-ddTHH:mm:ss.ffffffZ} conn={_connection} {command} offset={offset} length={length} result={result} latency_us={latency}"));
        }
    }

    /// <summary>The file every connection's view writes to.</summary>
    private sealed class LogFile : IDisposable
    {
        private readonly StreamWriter _writer;
        private readonly Lock _lock = new();
        private int _connections;

        public LogFile(string path)
        {
            _writer = new StreamWriter(new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read)) { AutoFlush = true };
        }

        public int NextConnection() => Interlocked.Increment(ref _connections);

        public void Write(string line)
        {
            lock (_lock)
            {
                try
                {
                    _writer.WriteLine(line);
                }
                catch (ObjectDisposedException)
                {
                    // A request finishing after the server closed the log: nothing left to write to.
                }
            }
        }

        public void Dispose()
        {
            lock (_lock)
            {
                _writer.Dispose();
            }
        }
    }
}
