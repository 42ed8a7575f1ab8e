using Spindle.Protocol;

namespace Spindle.Storage;

/// <summary>
/// What a backend can do. The transmission flags an export advertises are derived from these, so a backend
/// never has a command routed to it that it did not declare.
/// </summary>
[Flags]
public enum BlockDeviceFeatures
{
    None = 0,

    /// <summary>WRITE (and, with the other write features, anything that changes data).</summary>
    Write = 1 << 0,

    /// <summary>FLUSH makes every completed write durable.</summary>
    Flush = 1 << 1,

    /// <summary>A write with FUA is durable before it completes.</summary>
    Fua = 1 << 2,

    /// <summary>TRIM (a hint: the backend may ignore it).</summary>
    Trim = 1 << 3,

    /// <summary>WRITE_ZEROES, including NO_HOLE.</summary>
    WriteZeroes = 1 << 4,

    /// <summary>WRITE_ZEROES with FAST_ZERO: fail at once with ENOTSUP when zeroing is not cheap.</summary>
    FastZero = 1 << 5,

    /// <summary>CACHE (prefetch hint).</summary>
    Cache = 1 << 6,

    /// <summary>The backend reports allocation (holes and zeroes) through <see cref="BlockDevice.GetExtentsAsync"/>.</summary>
    Extents = 1 << 7,

    /// <summary>
    /// No private cache: a FLUSH or FUA on one handle covers writes made through every other handle to the same
    /// storage, so several connections may share the export (NBD_FLAG_CAN_MULTI_CONN).
    /// </summary>
    SharedCache = 1 << 8,

    /// <summary>Rotational medium hint.</summary>
    Rotational = 1 << 9,
}

/// <summary>Options of <see cref="BlockDevice.WriteZeroesAsync"/>.</summary>
[Flags]
public enum ZeroFlags
{
    None = 0,

    /// <summary>Make the data durable before completing (FUA).</summary>
    Fua = 1 << 0,

    /// <summary>Keep the range allocated: do not punch a hole.</summary>
    NoHole = 1 << 1,

    /// <summary>Fail with <see cref="NbdError.NotSupported"/> at once unless zeroing is cheaper than writing.</summary>
    FastOnly = 1 << 2,
}

/// <summary>
/// A range of bytes that an export serves: a file, a block device, memory, a remote image. Implementations are
/// called concurrently from many requests and connections and must be thread-safe.
/// </summary>
/// <remarks>
/// Optional operations answer <see cref="NbdError.InvalidArgument"/> until overridden, and a backend declares
/// those it implements in <see cref="Features"/>. Offsets and lengths arrive already checked against
/// <see cref="Size"/>. Failures are reported by throwing <see cref="BlockDeviceException"/> (or an
/// <see cref="IOException"/>, which is mapped from its errno).
/// </remarks>
public abstract class BlockDevice : IAsyncDisposable
{
    /// <summary>The size of the device in bytes.</summary>
    public abstract long Size { get; }

    /// <summary>The operations this backend supports.</summary>
    public abstract BlockDeviceFeatures Features { get; }

    /// <summary>
    /// The block size constraints this backend needs, or null for the defaults (1, 4096, 32 MiB).
    /// </summary>
    public virtual BlockSizeConstraints? BlockSizes => null;

    /// <summary>
    /// How many requests the device serves at once to good effect: beyond this they only wait in a queue inside it.
    /// A caller that runs many requests in parallel (<c>spindle copy</c>) keeps at most this many in flight. An NBD
    /// export reports its connections times the requests each connection may have outstanding. Default: null, no
    /// limit of the device's own (a local file: the kernel queues as deep as it is asked to).
    /// </summary>
    public virtual int? QueueDepth => null;

    /// <summary>
    /// How many writes are worth running at once; more only contend inside the device (buffered writes to one file
    /// serialise on its inode lock in the kernel). A caller writing in parallel holds the others back rather than
    /// have them spin. Default: null, no limit beyond <see cref="QueueDepth"/>.
    /// </summary>
    public virtual int? MaxConcurrentWrites => null;

    /// <summary>A short human-readable description of what backs the device, for logs and LIST.</summary>
    public virtual string Description => GetType().Name;

    /// <summary>Fills <paramref name="destination"/> with the bytes at <paramref name="offset"/>.</summary>
    public abstract ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken);

    /// <summary>Writes <paramref name="source"/> at <paramref name="offset"/>, durably first if <paramref name="fua"/>.</summary>
    public virtual ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        throw Unsupported("WRITE");

    /// <summary>
    /// Reads only if it can be done at once without waiting for a device (for a file: the bytes are in the page
    /// cache). The server calls this on the connection's own thread and falls back to <see cref="ReadAsync"/> on a
    /// pool thread when it returns false, so a slow read never holds up the connection. Default: false.
    /// </summary>
    public virtual bool TryReadImmediate(long offset, Span<byte> destination) => false;

    /// <summary>
    /// Writes only if it can be done at once without waiting for a device (a buffered write that will not block).
    /// Never called for FUA writes. Returning false sends the write through <see cref="WriteAsync"/>. Default: false.
    /// </summary>
    public virtual bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source) => false;

    /// <summary>
    /// True when every asynchronous operation only queues the work and returns at once (a backend with its own
    /// asynchronous I/O, such as librbd's aio calls). The server then calls them on the connection's own thread
    /// instead of paying for a hop to the thread pool. Default: false (operations may block the calling thread).
    /// </summary>
    public virtual bool SubmitsWithoutBlocking => false;

    /// <summary>Makes every completed write durable.</summary>
    public virtual ValueTask FlushAsync(CancellationToken cancellationToken) => throw Unsupported("FLUSH");

    /// <summary>Discards a range. The contents are undefined afterwards; doing nothing is a valid implementation.</summary>
    public virtual ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        throw Unsupported("TRIM");

    /// <summary>Makes a range read as zeroes.</summary>
    public virtual ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        throw Unsupported("WRITE_ZEROES");

    /// <summary>Prefetches a range. Must not change what reads return.</summary>
    public virtual ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    /// <summary>
    /// Describes the allocation of the range starting at <paramref name="offset"/>. Extents are appended to
    /// <paramref name="extents"/> in order from <paramref name="offset"/>; the backend may stop early (at least one
    /// extent is required) but never describes bytes beyond <paramref name="offset"/> + <paramref name="length"/>.
    /// </summary>
    public virtual ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        extents.Add(length, AllocationFlags.Data);
        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// Metadata contexts this device answers besides <c>base:allocation</c> (which comes from
    /// <see cref="GetExtentsAsync"/>). Default: none.
    /// </summary>
    public virtual IReadOnlyList<MetaContextSource> MetaContexts => [];

    /// <summary>
    /// The device one client connection works on, asked for when the connection enters transmission. Default: this
    /// device, shared by every connection. A layer that keeps each connection's writes apart (nbd-server's
    /// <c>copyonwrite</c>) returns a new device, which the server disposes when that connection ends.
    /// </summary>
    public virtual ValueTask<BlockDevice> OpenConnectionAsync(CancellationToken cancellationToken) => ValueTask.FromResult(this);

    public ValueTask DisposeAsync()
    {
        GC.SuppressFinalize(this);
        return DisposeAsyncCore();
    }

    protected virtual ValueTask DisposeAsyncCore() => ValueTask.CompletedTask;

    private BlockDeviceException Unsupported(string operation) =>
        new(NbdError.InvalidArgument, $"{operation} is not supported by {Description}");
}

/// <summary>A backend failure that carries the NBD error to report.</summary>
public sealed class BlockDeviceException : Exception
{
    public BlockDeviceException(NbdError error, string message)
        : base(message) => Error = error;

    public BlockDeviceException(NbdError error, string message, Exception innerException)
        : base(message, innerException) => Error = error;

    public BlockDeviceException()
        : this(NbdError.IO, "I/O error")
    {
    }

    public BlockDeviceException(string message)
        : this(NbdError.IO, message)
    {
    }

    public BlockDeviceException(string message, Exception innerException)
        : this(NbdError.IO, message, innerException)
    {
    }

    public NbdError Error { get; }
}
