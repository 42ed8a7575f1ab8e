using System.Runtime.InteropServices;

namespace Spindle.Fuse.Tests.Support;

/// <summary>
/// The system calls the tests use to drive the mounted file exactly as programs do: open flags (O_SYNC, O_DSYNC,
/// O_DIRECT), pread/pwrite, fsync/fdatasync/syncfs, fallocate, lseek. Every call returns the result or -errno.
/// </summary>
internal static unsafe partial class Posix
{
    public const int ORdOnly = 0;
    public const int OWrOnly = 1;
    public const int ORdWr = 2;
    public const int OCreat = 0x40;
    public const int OTrunc = 0x200;
    public const int ODsync = 0x1000;
    public const int ODirect = 0x4000;
    public const int OSync = 0x101000;
    public const int OCloExec = 0x80000;

    public const int FallocKeepSize = 0x01;
    public const int FallocPunchHole = 0x02;
    public const int FallocZeroRange = 0x10;

    public const int SeekData = 3;
    public const int SeekHole = 4;

    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EIO = 5;
    public const int ENXIO = 6;
    public const int EACCES = 13;
    public const int EBUSY = 16;
    public const int ENOTDIR = 20;
    public const int EINVAL = 22;
    public const int ENOSPC = 28;
    public const int EROFS = 30;
    public const int EOPNOTSUPP = 95;
    public const int ENOTCONN = 107;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int OpenNative(string path, int flags, uint mode);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int CloseNative(int fd);

    [LibraryImport("libc", EntryPoint = "pread", SetLastError = true)]
    private static partial nint PReadNative(int fd, byte* buffer, nint count, long offset);

    [LibraryImport("libc", EntryPoint = "pwrite", SetLastError = true)]
    private static partial nint PWriteNative(int fd, byte* buffer, nint count, long offset);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int FsyncNative(int fd);

    [LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    private static partial int FdatasyncNative(int fd);

    [LibraryImport("libc", EntryPoint = "syncfs", SetLastError = true)]
    private static partial int SyncfsNative(int fd);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static partial int FallocateNative(int fd, int mode, long offset, long length);

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static partial long LSeekNative(int fd, long offset, int whence);

    [LibraryImport("libc", EntryPoint = "ftruncate", SetLastError = true)]
    private static partial int FtruncateNative(int fd, long length);

    [LibraryImport("libc", EntryPoint = "access", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int AccessNative(string path, int mode);

    public static int Open(string path, int flags) => Check(OpenNative(path, flags | OCloExec, 420));

    public static int Close(int fd) => Check(CloseNative(fd));

    public static long PRead(int fd, Span<byte> buffer, long offset)
    {
        fixed (byte* pointer = buffer)
        {
            return Check(PReadNative(fd, pointer, buffer.Length, offset));
        }
    }

    public static long PWrite(int fd, ReadOnlySpan<byte> buffer, long offset)
    {
        fixed (byte* pointer = buffer)
        {
            return Check(PWriteNative(fd, pointer, buffer.Length, offset));
        }
    }

    public static int Fsync(int fd) => Check(FsyncNative(fd));

    public static int Fdatasync(int fd) => Check(FdatasyncNative(fd));

    public static int Syncfs(int fd) => Check(SyncfsNative(fd));

    public static int Fallocate(int fd, int mode, long offset, long length) => Check(FallocateNative(fd, mode, offset, length));

    public static long LSeek(int fd, long offset, int whence) => Check(LSeekNative(fd, offset, whence));

    public static int Ftruncate(int fd, long length) => Check(FtruncateNative(fd, length));

    /// <summary>access(path, F_OK): 0 or -errno (ENOTCONN for a FUSE mount whose server is gone).</summary>
    public static int Probe(string path) => Check(AccessNative(path, 0));

    /// <summary>An aligned buffer for O_DIRECT.</summary>
    public static byte[] AlignedBuffer(int length) => GC.AllocateArray<byte>(length, pinned: true);

    private static int Check(int result) => result >= 0 ? result : -Marshal.GetLastPInvokeError();

    private static long Check(nint result) => result >= 0 ? result : -Marshal.GetLastPInvokeError();

    private static long Check(long result) => result >= 0 ? result : -Marshal.GetLastPInvokeError();
}

/// <summary>An open file descriptor closed on dispose.</summary>
internal sealed class PosixFile : IDisposable
{
    private PosixFile(int fd) => Fd = fd;

    public int Fd { get; private set; }

    /// <summary>Opens <paramref name="path"/> or fails the test with the errno.</summary>
    public static PosixFile Open(string path, int flags)
    {
        var fd = Posix.Open(path, flags);
        Xunit.Assert.True(fd >= 0, $"open({path}, 0x{flags:x}) failed: {Marshal.GetPInvokeErrorMessage(-fd)}");
        return new PosixFile(fd);
    }

    public void WriteExactly(ReadOnlySpan<byte> data, long offset) =>
        Xunit.Assert.Equal(data.Length, Posix.PWrite(Fd, data, offset));

    public byte[] ReadExactly(long offset, int length)
    {
        var buffer = new byte[length];
        var done = 0;
        for (var attempt = 0; attempt < 64 && done < length; attempt++)
        {
            var read = Posix.PRead(Fd, buffer.AsSpan(done), offset + done);
            Xunit.Assert.True(read > 0, $"pread at {offset + done} returned {read}");
            done += (int)read;
        }

        Xunit.Assert.Equal(length, done);
        return buffer;
    }

    public void Dispose()
    {
        if (Fd >= 0)
        {
            Posix.Close(Fd);
            Fd = -1;
        }
    }
}
