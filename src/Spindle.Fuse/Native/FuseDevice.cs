using System.Runtime.InteropServices;
using Spindle.Protocol;

namespace Spindle.Fuse.Native;

/// <summary>
/// An open /dev/fuse: one read() takes one request, one write() sends one reply. Many threads may read and write
/// at once; the kernel hands each request to exactly one reader and takes each reply whole.
/// </summary>
internal sealed unsafe class FuseDevice : IDisposable
{
    public const string Path = "/dev/fuse";

    private int _fd;

    private FuseDevice(int fd) => _fd = fd;

    /// <summary>The descriptor, for the mount options (fd=N).</summary>
    public int Descriptor => _fd;

    /// <summary>Opens /dev/fuse (close-on-exec, so no child process keeps the connection alive).</summary>
    public static FuseDevice Open()
    {
        var fd = LibC.OpenOrErrno(Path, LibC.ORdWr | LibC.OCloExec);
        if (fd < 0)
        {
            throw new FuseMountException(-fd, fd == -Errno.ENOENT
                ? "/dev/fuse does not exist: the kernel has no FUSE support (modprobe fuse)"
                : $"cannot open /dev/fuse: {Errno.Describe(-fd)}");
        }

        return new FuseDevice(fd);
    }

    /// <summary>Adopts a descriptor received from fusermount3.</summary>
    public static FuseDevice Adopt(int fd) => new(fd);

    /// <summary>Reads one request into <paramref name="buffer"/>; returns its length or -errno.</summary>
    public int Read(byte[] buffer)
    {
        fixed (byte* pointer = buffer)
        {
            var result = LibC.Read(Volatile.Read(ref _fd), pointer, buffer.Length);
            return result >= 0 ? (int)result : -Marshal.GetLastPInvokeError();
        }
    }

    /// <summary>Writes one reply; returns 0 or the errno (ENOENT: the request was interrupted and is gone).</summary>
    public int Write(byte[] buffer, int length)
    {
        fixed (byte* pointer = buffer)
        {
            for (var attempt = 0; attempt < 16; attempt++)
            {
                var result = LibC.Write(Volatile.Read(ref _fd), pointer, length);
                if (result >= 0)
                {
                    return 0;
                }

                var errno = Marshal.GetLastPInvokeError();
                if (errno != Errno.EINTR)
                {
                    return errno;
                }
            }

            return Errno.EINTR;
        }
    }

    public void Dispose()
    {
        var fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            _ = LibC.Close(fd);
        }
    }
}
