using Microsoft.Win32.SafeHandles;
using Spindle.Protocol;
using Spindle.Storage.Native;

namespace Spindle.Storage;

/// <summary>
/// A regular file or a block device, read and written with positional I/O (pread/pwrite). Reads of cached data
/// are served at once (preadv2 RWF_NOWAIT), TRIM punches holes, WRITE_ZEROES uses fallocate (punch hole or zero
/// range, falling back to writing zeroes), FLUSH is fdatasync, FUA writes use pwritev2(RWF_DSYNC), and allocation
/// comes from SEEK_DATA/SEEK_HOLE.
/// </summary>
/// <remarks>
/// There is no cache above the kernel's page cache, which every handle to the file shares, so a FLUSH on one
/// connection covers writes made on all of them: the export can advertise multi-conn.
/// </remarks>
public sealed class FileBlockDevice : BlockDevice
{
    private static readonly byte[] ZeroBuffer = new byte[1024 * 1024];

    private readonly SafeFileHandle _handle;
    private readonly string _path;
    private readonly bool _readOnly;
    private readonly bool _isBlockDevice;
    private SafeFileHandle? _syncHandle;
    private volatile bool _nowaitUnsupported;
    private volatile bool _dsyncUnsupported;
    private volatile bool _punchHoleUnsupported;
    private volatile bool _zeroRangeUnsupported;
    private volatile bool _seekDataUnsupported;

    private FileBlockDevice(SafeFileHandle handle, string path, long size, bool readOnly, bool isBlockDevice)
    {
        _handle = handle;
        _path = path;
        Size = size;
        _readOnly = readOnly;
        _isBlockDevice = isBlockDevice;
    }

    public override long Size { get; }

    public string Path => _path;

    public bool IsBlockDevice => _isBlockDevice;

    /// <summary>
    /// Two: buffered writes to one file serialise on its inode lock, so dozens of parallel writers only spin on it
    /// (a 1 GiB <c>spindle copy</c> to a file burnt 3 s of system time with 64 writers against 0.6 s with two).
    /// </summary>
    public override int? MaxConcurrentWrites => 2;

    public override string Description => _isBlockDevice ? $"block device {_path}" : $"file {_path}";

    public override BlockDeviceFeatures Features
    {
        get
        {
            var features = BlockDeviceFeatures.Flush | BlockDeviceFeatures.Cache | BlockDeviceFeatures.SharedCache;
            if (!_isBlockDevice)
            {
                features |= BlockDeviceFeatures.Extents;
            }

            if (!_readOnly)
            {
                features |= BlockDeviceFeatures.Write | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
                            BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero;
            }

            return features;
        }
    }

    /// <summary>
    /// Opens <paramref name="path"/>. With <paramref name="createSize"/>, a missing regular file is created sparse at
    /// that size (nbd-server's <c>filesize</c>).
    /// </summary>
    /// <exception cref="FileNotFoundException">The path does not exist and no size to create it with was given.</exception>
    /// <exception cref="UnauthorizedAccessException">The file cannot be opened with the requested access.</exception>
    public static FileBlockDevice Open(string path, bool readOnly, long? createSize = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var fullPath = System.IO.Path.GetFullPath(path);
        var exists = File.Exists(fullPath) || fullPath.StartsWith("/dev/", StringComparison.Ordinal);
        if (!exists && createSize is null)
        {
            throw new FileNotFoundException($"'{fullPath}' does not exist (give a size to create it)", fullPath);
        }

        var mode = exists ? FileMode.Open : FileMode.CreateNew;
        var access = readOnly ? FileAccess.Read : FileAccess.ReadWrite;
        var handle = File.OpenHandle(fullPath, mode, access, FileShare.ReadWrite | FileShare.Delete);
        try
        {
            if (!exists)
            {
                RandomAccess.SetLength(handle, createSize!.Value);
            }

            var isBlockDevice = LinuxFile.IsBlockDevice(handle);
            var size = LinuxFile.Seek(handle, 0, LinuxFile.SeekEnd);
            if (size < 0)
            {
                throw new IOException($"cannot determine the size of '{fullPath}' (errno {-size})");
            }

            return new FileBlockDevice(handle, fullPath, size, readOnly, isBlockDevice);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Serves a file the caller already opened (for example with openat2 confined beneath a directory).
    /// <paramref name="path"/> is only for messages. The device owns the handle from then on.
    /// </summary>
    public static FileBlockDevice FromHandle(SafeFileHandle handle, string path, bool readOnly)
    {
        ArgumentNullException.ThrowIfNull(handle);
        var isBlockDevice = LinuxFile.IsBlockDevice(handle);
        var size = LinuxFile.Seek(handle, 0, LinuxFile.SeekEnd);
        if (size < 0)
        {
            handle.Dispose();
            throw new IOException($"cannot determine the size of '{path}' (errno {-size})");
        }

        return new FileBlockDevice(handle, path, size, readOnly, isBlockDevice);
    }

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var span = destination.Span;
        var done = 0;
        while (done < span.Length)
        {
            int read;
            try
            {
                read = RandomAccess.Read(_handle, span[done..], offset + done);
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
            {
                throw Failure(exception, "read", offset);
            }

            if (read == 0)
            {
                // The file shrank under us (someone truncated it): what is gone reads as zeroes, as past EOF.
                span[done..].Clear();
                break;
            }

            done += read;
        }

        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// A read served from the page cache with preadv2(RWF_NOWAIT): it fails with EAGAIN instead of waiting for the
    /// disk, and the server then reads on a pool thread instead.
    /// </summary>
    public override bool TryReadImmediate(long offset, Span<byte> destination)
    {
        if (_nowaitUnsupported)
        {
            return false;
        }

        var read = LinuxFile.Read(_handle, destination, offset, LinuxFile.RwfNowait);
        if (read == destination.Length)
        {
            return true;
        }

        if (read == -Errno.EOPNOTSUPP || read == -Errno.EINVAL)
        {
            _nowaitUnsupported = true;
        }

        // EAGAIN (not cached), a short read (partly cached, or past a shrunken EOF) or an error: take the slow path,
        // which reads everything again and reports errors properly.
        return false;
    }

    /// <summary>
    /// A buffered write lands in the page cache and only waits for the disk under dirty-page throttling, which is
    /// backpressure the connection should feel anyway, so it runs at once. (RWF_NOWAIT for buffered writes is not
    /// supported on common file systems.)
    /// </summary>
    public override bool TryWriteImmediate(long offset, ReadOnlySpan<byte> source)
    {
        EnsureWritable();
        Write(_handle, source, offset);
        return true;
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        if (!fua)
        {
            Write(_handle, source.Span, offset);
        }
        else if (!_dsyncUnsupported && WriteDsync(source.Span, offset))
        {
            // pwritev2(RWF_DSYNC): durable when it returns, like a FUA write, and without flushing the whole file.
        }
        else
        {
            Write(SyncHandle(), source.Span, offset);
        }

        return ValueTask.CompletedTask;
    }

    private bool WriteDsync(ReadOnlySpan<byte> source, long offset)
    {
        var done = 0;
        while (done < source.Length)
        {
            var written = LinuxFile.Write(_handle, source[done..], offset + done, LinuxFile.RwfDsync);
            if (written == -Errno.EOPNOTSUPP || (written == -Errno.EINVAL && done == 0))
            {
                _dsyncUnsupported = true;
                return false;
            }

            if (written == -Errno.EINTR)
            {
                continue;
            }

            if (written <= 0)
            {
                throw Failure((int)-written, "write", offset + done);
            }

            done += (int)written;
        }

        return true;
    }

    private void Write(SafeFileHandle handle, ReadOnlySpan<byte> source, long offset)
    {
        try
        {
            RandomAccess.Write(handle, source, offset);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            throw Failure(exception, "write", offset);
        }
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        LinuxFile.DataSync(_handle);
        return ValueTask.CompletedTask;
    }

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        EnsureWritable();
        if (!_punchHoleUnsupported)
        {
            var errno = LinuxFile.Allocate(_handle, LinuxFile.FallocPunchHole | LinuxFile.FallocKeepSize, offset, length);
            if (IsUnsupported(errno))
            {
                // TRIM is advisory: a file system that cannot punch holes simply keeps the data.
                _punchHoleUnsupported = true;
            }
            else if (errno != 0)
            {
                throw Failure(errno, "trim", offset);
            }
        }

        if (fua)
        {
            LinuxFile.DataSync(_handle);
        }

        return ValueTask.CompletedTask;
    }

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        EnsureWritable();
        if (!TryZeroCheaply(offset, length, (flags & ZeroFlags.NoHole) != 0))
        {
            if ((flags & ZeroFlags.FastOnly) != 0)
            {
                throw new BlockDeviceException(NbdError.NotSupported, "zeroing this range is no faster than writing it");
            }

            WriteZeroBuffers(offset, length);
        }

        if ((flags & ZeroFlags.Fua) != 0)
        {
            LinuxFile.DataSync(_handle);
        }

        return ValueTask.CompletedTask;
    }

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken)
    {
        LinuxFile.AdviseWillNeed(_handle, offset, length);
        return ValueTask.CompletedTask;
    }

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        var end = offset + length;
        var position = offset;
        while (position < end && !extents.IsFull)
        {
            if (_seekDataUnsupported)
            {
                extents.Add(end - position, AllocationFlags.Data);
                break;
            }

            var data = LinuxFile.Seek(_handle, position, LinuxFile.SeekData);
            if (data == -Errno.ENXIO)
            {
                // No data from here to EOF. Beyond EOF (the file shrank) also reads as zeroes.
                extents.Add(end - position, AllocationFlags.Hole | AllocationFlags.Zero);
                break;
            }

            if (data < 0)
            {
                // EINVAL or EOPNOTSUPP: the file system cannot tell. Status 0 ("data") is always a safe answer.
                _seekDataUnsupported = true;
                continue;
            }

            if (data > position)
            {
                var holeEnd = Math.Min(data, end);
                extents.Add(holeEnd - position, AllocationFlags.Hole | AllocationFlags.Zero);
                position = holeEnd;
                if (position >= end)
                {
                    break;
                }
            }

            var hole = LinuxFile.Seek(_handle, position, LinuxFile.SeekHole);
            var dataEnd = hole < 0 ? end : Math.Min(Math.Max(hole, position + 1), end);
            extents.Add(dataEnd - position, AllocationFlags.Data);
            position = dataEnd;
        }

        return ValueTask.CompletedTask;
    }

    protected override ValueTask DisposeAsyncCore()
    {
        _syncHandle?.Dispose();
        _handle.Dispose();
        return ValueTask.CompletedTask;
    }

    private bool TryZeroCheaply(long offset, long length, bool noHole)
    {
        if (!noHole && !_punchHoleUnsupported)
        {
            var errno = LinuxFile.Allocate(_handle, LinuxFile.FallocPunchHole | LinuxFile.FallocKeepSize, offset, length);
            if (errno == 0)
            {
                return true;
            }

            if (!IsUnsupported(errno))
            {
                throw Failure(errno, "write zeroes", offset);
            }

            _punchHoleUnsupported = true;
        }

        if (!_zeroRangeUnsupported)
        {
            // ZERO_RANGE keeps (or makes) the range allocated, which is what NO_HOLE asks for.
            var errno = LinuxFile.Allocate(_handle, LinuxFile.FallocZeroRange | LinuxFile.FallocKeepSize, offset, length);
            if (errno == 0)
            {
                return true;
            }

            if (!IsUnsupported(errno))
            {
                throw Failure(errno, "write zeroes", offset);
            }

            _zeroRangeUnsupported = true;
        }

        return false;
    }

    private void WriteZeroBuffers(long offset, long length)
    {
        var position = offset;
        var end = offset + length;
        while (position < end)
        {
            var count = (int)Math.Min(ZeroBuffer.Length, end - position);
            try
            {
                RandomAccess.Write(_handle, ZeroBuffer.AsSpan(0, count), position);
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
            {
                throw Failure(exception, "write zeroes", position);
            }

            position += count;
        }
    }

    private SafeFileHandle SyncHandle()
    {
        var handle = Volatile.Read(ref _syncHandle);
        if (handle is not null)
        {
            return handle;
        }

        // Fallback when RWF_DSYNC is unavailable. O_SYNC: each write through this handle is durable when pwrite
        // returns, which is exactly FUA and, unlike write-then-fdatasync, does not wait for every other dirty page.
        var opened = File.OpenHandle(_path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete, FileOptions.WriteThrough);
        var existing = Interlocked.CompareExchange(ref _syncHandle, opened, null);
        if (existing is not null)
        {
            opened.Dispose();
            return existing;
        }

        return opened;
    }

    private void EnsureWritable()
    {
        if (_readOnly)
        {
            throw new BlockDeviceException(NbdError.NotPermitted, $"{Description} is read-only");
        }
    }

    private static bool IsUnsupported(int errno) =>
        errno is Errno.EOPNOTSUPP or Errno.ENOSYS or Errno.ENODEV || (errno == Errno.EINVAL);

    private BlockDeviceException Failure(int errno, string operation, long offset) =>
        new(Errno.ToNbdError(errno), $"{operation} at {offset} on {Description} failed: {System.Runtime.InteropServices.Marshal.GetPInvokeErrorMessage(errno)}");

    private BlockDeviceException Failure(Exception exception, string operation, long offset)
    {
        // On Unix an IOException's HResult carries the errno.
        var error = exception is UnauthorizedAccessException ? NbdError.NotPermitted : Errno.ToNbdError(exception.HResult);
        return new BlockDeviceException(error, $"{operation} at {offset} on {Description} failed: {exception.Message}", exception);
    }
}
