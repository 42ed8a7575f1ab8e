using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using Spindle.Protocol;
using Spindle.Storage.Native;

namespace Spindle.Storage.Qcow2;

/// <summary>
/// The image file under a qcow2 image: positional reads and writes that either complete or throw a
/// <see cref="BlockDeviceException"/> with the NBD error of the failing errno, fdatasync and hole punching.
/// </summary>
internal sealed class ImageFile : IDisposable
{
    private readonly SafeFileHandle _handle;
    private long _length;
    private volatile bool _punchUnsupported;
    private volatile bool _nowaitUnsupported;

    private ImageFile(SafeFileHandle handle, string path, long length)
    {
        _handle = handle;
        Path = path;
        _length = length;
    }

    public string Path { get; }

    /// <summary>The file length as last seen or grown by our own writes.</summary>
    public long Length => Volatile.Read(ref _length);

    public static ImageFile Open(string path, bool readOnly)
    {
        var handle = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
        var length = LinuxFile.Seek(handle, 0, LinuxFile.SeekEnd);
        if (length < 0)
        {
            handle.Dispose();
            throw new IOException($"cannot determine the size of '{path}' (errno {-length})");
        }

        return new ImageFile(handle, path, length);
    }

    /// <summary>Reads exactly <paramref name="destination"/>; bytes past the end of the file read as zeroes.</summary>
    public void Read(Span<byte> destination, long offset)
    {
        var done = 0;
        while (done < destination.Length)
        {
            int read;
            try
            {
                read = RandomAccess.Read(_handle, destination[done..], offset + done);
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
            {
                throw Failure(exception, "read", offset + done);
            }

            if (read == 0)
            {
                destination[done..].Clear();
                return;
            }

            done += read;
        }
    }

    /// <summary>preadv2(RWF_NOWAIT): true only when every byte came from the page cache at once.</summary>
    public bool TryReadCached(Span<byte> destination, long offset)
    {
        if (_nowaitUnsupported)
        {
            return false;
        }

        var read = LinuxFile.Read(_handle, destination, offset, LinuxFile.RwfNowait);
        if (read == -Errno.EOPNOTSUPP || read == -Errno.EINVAL)
        {
            _nowaitUnsupported = true;
        }

        return read == destination.Length;
    }

    public void Write(ReadOnlySpan<byte> source, long offset)
    {
        try
        {
            RandomAccess.Write(_handle, source, offset);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            throw Failure(exception, "write", offset);
        }

        var end = offset + source.Length;
        var length = Volatile.Read(ref _length);
        while (end > length)
        {
            var seen = Interlocked.CompareExchange(ref _length, end, length);
            if (seen == length)
            {
                break;
            }

            length = seen;
        }
    }

    /// <summary>fdatasync: every write before it is durable, data and metadata alike.</summary>
    public void Sync() => LinuxFile.DataSync(_handle);

    /// <summary>Gives a freed range back to the file system; a file system that cannot punch holes keeps it.</summary>
    public void PunchHole(long offset, long length)
    {
        if (_punchUnsupported || offset >= Length)
        {
            return;
        }

        var errno = LinuxFile.Allocate(_handle, LinuxFile.FallocPunchHole | LinuxFile.FallocKeepSize, offset, length);
        if (errno is Errno.EOPNOTSUPP or Errno.ENOSYS or Errno.EINVAL or Errno.ENODEV)
        {
            _punchUnsupported = true;
        }
        else if (errno != 0)
        {
            throw new BlockDeviceException(Errno.ToNbdError(errno), $"punching a hole at {offset} in {Path} failed: {Marshal.GetPInvokeErrorMessage(errno)}");
        }
    }

    public void Dispose() => _handle.Dispose();

    private BlockDeviceException Failure(Exception exception, string operation, long offset)
    {
        var error = exception is UnauthorizedAccessException ? NbdError.NotPermitted : Errno.ToNbdError(exception.HResult);
        return new BlockDeviceException(error, $"{operation} at {offset} in {Path} failed: {exception.Message}", exception);
    }
}
