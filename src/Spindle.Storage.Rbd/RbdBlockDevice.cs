using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging.Abstractions;
using Spindle.Protocol;
using Spindle.Storage.Rbd.Native;

namespace Spindle.Storage.Rbd;

/// <summary>
/// An RBD image (or a snapshot of one) in a Ceph cluster, through librbd. READ and WRITE are librbd asynchronous
/// requests completed by librbd's callback, so any number are in flight without a thread waiting on each; FLUSH is
/// rbd_aio_flush; FUA is the request followed by a flush; TRIM is a discard; WRITE_ZEROES is rbd_aio_write_zeroes
/// (a discard skips unaligned parts of objects, so it cannot zero); allocation comes from rbd_diff_iterate2.
/// </summary>
/// <remarks>
/// One image handle serves every connection, and librbd's cache is off by default, so a FLUSH on one connection
/// covers writes made on all of them, and other servers opening the same image see the same disk: the export
/// advertises multi-conn. Ceph keeps the data replicated; Spindle adds no replication of its own.
/// </remarks>
public sealed partial class RbdBlockDevice : BlockDevice
{
    private static readonly TimeSpan CloseTimeout = TimeSpan.FromSeconds(30);

    private readonly RbdConnection _connection;
    private readonly RbdAioOperationPool _operations;
    private readonly string _description;
    private readonly bool _readOnly;
    private nint _image;
    private long _size;
    private long _inFlight;
    private int _disposing;
    private readonly TaskCompletionSource _idle = new(TaskCreationOptions.RunContinuationsAsynchronously);

    private RbdBlockDevice(RbdConnection connection, nint image, RbdOptions options, long size, bool fastDiff)
    {
        _connection = connection;
        _image = image;
        _size = size;
        _logger = options.Logger ?? NullLogger.Instance;
        Image = options.Image;
        _readOnly = options.ReadOnly || options.Image.IsSnapshot;
        _fastDiff = fastDiff;
        _description = $"rbd {options.Image}";
        _operations = new RbdAioOperationPool(Failure, FinishRequest);
    }

    /// <summary>
    /// The image's size as last read: at the open, then whenever the header watch reports a change or the timer of
    /// <see cref="RbdOptions.SizeCheckInterval"/> fires (see RbdBlockDevice.Resize.cs). A connection keeps the size it
    /// negotiated; new ones get this.
    /// </summary>
    public override long Size => Volatile.Read(ref _size);

    /// <summary>The image (and snapshot) served.</summary>
    public RbdImageSpec Image { get; }

    public bool IsReadOnly => _readOnly;

    public override string Description => _description;

    /// <summary>Reads, writes, flushes, discards and zeroing are rbd_aio_* calls that only queue the work.</summary>
    public override bool SubmitsWithoutBlocking => true;

    public override BlockDeviceFeatures Features =>
        BlockDeviceFeatures.Flush | BlockDeviceFeatures.Extents | BlockDeviceFeatures.SharedCache |
        (_readOnly
            ? BlockDeviceFeatures.None
            : BlockDeviceFeatures.Write | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim | BlockDeviceFeatures.WriteZeroes |
              BlockDeviceFeatures.FastZero);

    /// <summary>
    /// Connects to the cluster and opens the image; a snapshot, or <see cref="RbdOptions.ReadOnly"/>, opens it
    /// read-only. Bounded by <see cref="RbdOptions.ConnectTimeout"/>.
    /// </summary>
    /// <exception cref="RbdOpenException">The library, the cluster, the key, the pool or the image is missing or refused.</exception>
    public static RbdBlockDevice Open(RbdOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var connection = RbdConnection.Connect(options);
        nint image = 0;
        try
        {
            var readOnly = options.ReadOnly || options.Image.IsSnapshot;
            image = OpenImage(connection, options, readOnly);
            var result = LibRbd.GetSize(image, out var size);
            if (result < 0)
            {
                throw new RbdOpenException($"cannot read the size of {options.Image}: {RbdErrors.Describe(-result)}", -result);
            }

            if (size > long.MaxValue)
            {
                throw new RbdOpenException($"{options.Image} is larger than {long.MaxValue} bytes");
            }

            var fastDiff = LibRbd.GetFeatures(image, out var features) == 0 && (features & LibRbd.FeatureFastDiff) != 0 &&
                           LibRbd.GetFlags(image, out var flags) == 0 && (flags & LibRbd.FlagFastDiffInvalid) == 0;
            var device = new RbdBlockDevice(connection, image, options, (long)size, fastDiff);
            device.StartSizeTracking(options);
            return device;
        }
        catch
        {
            if (image != 0)
            {
                _ = LibRbd.Close(image);
            }

            connection.Dispose();
            throw;
        }
    }

    public override unsafe ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        // The token is not honoured once the request is with librbd: the buffer belongs to librbd until its
        // completion fires, and completing early would hand it back to the server while librbd still writes to it.
        var operation = StartRequest("read", offset, out var completion);
        var result = LibRbd.AioRead(_image, (ulong)offset, (nuint)destination.Length, operation.PinForRead(destination), completion);
        return Submitted(operation, completion, result);
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        return fua ? WriteThenFlushAsync(offset, source) : WriteCore(offset, source);
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        var operation = StartRequest("flush", 0, out var completion);
        return Submitted(operation, completion, LibRbd.AioFlush(_image, completion));
    }

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        return fua ? TrimThenFlushAsync(offset, length) : TrimCore(offset, length);
    }

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        EnsureWritable();
        var thick = (flags & ZeroFlags.NoHole) != 0;
        if (thick && (flags & ZeroFlags.FastOnly) != 0)
        {
            // Zeroing that keeps the range allocated is a write of zeroes to the OSDs: no faster than writing.
            throw new BlockDeviceException(NbdError.NotSupported, "zeroing with NO_HOLE writes the zeroes: no faster than a write");
        }

        return (flags & ZeroFlags.Fua) != 0 ? ZeroThenFlushAsync(offset, length, thick) : ZeroCore(offset, length, thick);
    }

    protected override async ValueTask DisposeAsyncCore()
    {
        if (Interlocked.Exchange(ref _disposing, 1) != 0)
        {
            return;
        }

        await StopSizeTimerAsync().ConfigureAwait(false);
        if (Interlocked.Read(ref _inFlight) == 0)
        {
            _idle.TrySetResult();
        }

        // The server answers or abandons its requests before disposing exports, so this is normally at once. A
        // request librbd never completes (the cluster is gone) must not hang the stop forever.
        try
        {
            await _idle.Task.WaitAsync(CloseTimeout).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            // Closing with requests in flight would free what librbd still uses: leave the image open.
            return;
        }

        var image = _image;
        _image = 0;
        var close = Task.Run(() =>
        {
            // rbd_update_unwatch before rbd_close: once it returns, librbd no longer calls back into this object.
            StopWatching(image);
            return LibRbd.Close(image);
        });
        try
        {
            await close.WaitAsync(CloseTimeout).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            return;
        }

        _operations.Close();
        _connection.Dispose();
    }

    private static nint OpenImage(RbdConnection connection, RbdOptions options, bool readOnly)
    {
        var spec = options.Image;
        var result = OpenBounded(connection, spec, readOnly, options.ConnectTimeout, out var image);
        if (result >= 0)
        {
            return image;
        }

        var errno = -result;
        if (errno == Errno.ENOENT && spec.Snapshot is not null &&
            OpenBounded(connection, spec with { Snapshot = null }, readOnly: true, options.ConnectTimeout, out var head) >= 0)
        {
            _ = LibRbd.Close(head);
            throw new RbdOpenException($"image {spec with { Snapshot = null }} has no snapshot named '{spec.Snapshot}' (list them with: rbd snap ls {spec with { Snapshot = null }})", errno);
        }

        throw new RbdOpenException(errno switch
        {
            Errno.ENOENT => $"image {spec with { Snapshot = null }} does not exist (list the pool with: rbd ls {spec.Pool}{(spec.Namespace.Length > 0 ? "/" + spec.Namespace : "")})",
            Errno.EACCES or Errno.EPERM =>
                $"client.{options.ClientId} may not open {spec}{(readOnly ? "" : " for writing")}: {RbdErrors.Describe(errno)} (check the user's osd caps, e.g. 'profile rbd pool={spec.Pool}')",
            Errno.ETIMEDOUT => $"opening {spec} did not finish within {options.ConnectTimeout.TotalSeconds:0.#} s (are the OSDs up?)",
            _ => $"cannot open {spec}: {RbdErrors.Describe(errno)}",
        }, errno);
    }

    /// <summary>rbd_aio_open under a deadline: reading the image header needs the OSDs, which may not answer.</summary>
    private static unsafe int OpenBounded(RbdConnection connection, RbdImageSpec spec, bool readOnly, TimeSpan timeout, out nint image)
    {
        image = 0;

        // librbd writes the handle when the open completes, which may be after we stop waiting: the slot is native
        // memory that is only freed once it has.
        var slot = (nint*)NativeMemory.AllocZeroed((nuint)sizeof(nint));
        var outcome = new OpenOutcome();
        var handle = GCHandle.Alloc(outcome);
        var result = LibRbd.AioCreateCompletion(GCHandle.ToIntPtr(handle), &OnOpenComplete, out var completion);
        if (result < 0)
        {
            handle.Free();
            NativeMemory.Free(slot);
            return result;
        }

        result = readOnly
            ? LibRbd.AioOpenReadOnly(connection.IoCtx, spec.Image, slot, spec.Snapshot, completion)
            : LibRbd.AioOpen(connection.IoCtx, spec.Image, slot, spec.Snapshot, completion);
        if (result < 0)
        {
            LibRbd.AioRelease(completion);
            handle.Free();
            NativeMemory.Free(slot);
            return result;
        }

        if (!outcome.Done.Wait(timeout))
        {
            // Abandoned: the callback still runs later and frees nothing; the slot and the handle leak.
            return -Errno.ETIMEDOUT;
        }

        handle.Free();
        image = *slot;
        NativeMemory.Free(slot);
        return (int)outcome.Result;
    }

    [UnmanagedCallersOnly]
    private static void OnOpenComplete(nint completion, nint argument)
    {
        var outcome = (OpenOutcome)GCHandle.FromIntPtr(argument).Target!;
        outcome.Result = LibRbd.AioGetReturnValue(completion);
        LibRbd.AioRelease(completion);
        outcome.Done.Set();
    }

    private unsafe ValueTask WriteCore(long offset, ReadOnlyMemory<byte> source)
    {
        var operation = StartRequest("write", offset, out var completion);
        var result = LibRbd.AioWrite(_image, (ulong)offset, (nuint)source.Length, operation.Pin(source), completion);
        return Submitted(operation, completion, result);
    }

    private ValueTask TrimCore(long offset, long length)
    {
        var operation = StartRequest("trim", offset, out var completion);
        return Submitted(operation, completion, LibRbd.AioDiscard(_image, (ulong)offset, (ulong)length, completion));
    }

    private ValueTask ZeroCore(long offset, long length, bool thick)
    {
        var operation = StartRequest("write zeroes", offset, out var completion);
        var flags = thick ? LibRbd.WriteZeroesThickProvision : 0;
        return Submitted(operation, completion, LibRbd.AioWriteZeroes(_image, (ulong)offset, (nuint)length, completion, flags, 0));
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask WriteThenFlushAsync(long offset, ReadOnlyMemory<byte> source)
    {
        await WriteCore(offset, source).ConfigureAwait(false);
        await FlushAsync(CancellationToken.None).ConfigureAwait(false);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask TrimThenFlushAsync(long offset, long length)
    {
        await TrimCore(offset, length).ConfigureAwait(false);
        await FlushAsync(CancellationToken.None).ConfigureAwait(false);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ZeroThenFlushAsync(long offset, long length, bool thick)
    {
        await ZeroCore(offset, length, thick).ConfigureAwait(false);
        await FlushAsync(CancellationToken.None).ConfigureAwait(false);
    }

    /// <summary>Counts a request in flight and gives it an operation and a librbd completion.</summary>
    private RbdAioOperation StartRequest(string name, long offset, out nint completion)
    {
        EnterRequest();
        var operation = _operations.Rent();
        var result = operation.Begin(name, offset, out completion);
        if (result < 0)
        {
            _operations.Return(operation);
            FinishRequest();
            throw Failure(name, offset, -result);
        }

        return operation;
    }

    /// <summary>The request's ValueTask if librbd accepted it; if not, its completion will never fire.</summary>
    private ValueTask Submitted(RbdAioOperation operation, nint completion, int result)
    {
        if (result >= 0)
        {
            return operation.AsValueTask();
        }

        var name = operation.Name;
        var offset = operation.Offset;
        operation.Abandon(completion);
        FinishRequest();
        return ValueTask.FromException(Failure(name, offset, -result));
    }

    private void EnterRequest()
    {
        Interlocked.Increment(ref _inFlight);
        if (Volatile.Read(ref _disposing) != 0)
        {
            FinishRequest();
            throw new BlockDeviceException(NbdError.Shutdown, $"{_description} is closing");
        }
    }

    private void FinishRequest()
    {
        if (Interlocked.Decrement(ref _inFlight) == 0 && Volatile.Read(ref _disposing) != 0)
        {
            _idle.TrySetResult();
        }
    }

    private void EnsureWritable()
    {
        if (_readOnly)
        {
            throw new BlockDeviceException(NbdError.NotPermitted,
                Image.IsSnapshot ? $"{_description} is a snapshot: read-only" : $"{_description} is open read-only");
        }
    }

    private BlockDeviceException Failure(string operation, long offset, int errno)
    {
        var hint = errno == Errno.EROFS && !_readOnly
            ? " (another client holds the image's exclusive lock and refuses to release it; see docs/rbd.md)"
            : string.Empty;
        var where = operation == "flush" ? string.Empty : $" at {offset}";
        return new BlockDeviceException(RbdErrors.ToNbdError(errno), $"{operation}{where} on {_description} failed: {RbdErrors.Describe(errno)}{hint}");
    }

    private sealed class OpenOutcome
    {
        public ManualResetEventSlim Done { get; } = new();

        public long Result { get; set; }
    }
}
