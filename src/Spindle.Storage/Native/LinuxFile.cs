using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using Spindle.Protocol;

namespace Spindle.Storage.Native;

/// <summary>The few Linux file system calls .NET does not expose: lseek(SEEK_DATA/SEEK_HOLE), fallocate, fdatasync.</summary>
internal static partial class LinuxFile
{
    public const int SeekEnd = 2;
    public const int SeekData = 3;
    public const int SeekHole = 4;

    public const int FallocKeepSize = 0x01;
    public const int FallocPunchHole = 0x02;
    public const int FallocZeroRange = 0x10;

    public const int PosixFadvWillNeed = 3;

    public const int RwfDsync = 0x02;
    public const int RwfNowait = 0x08;


    private const uint FileTypeMask = 0xF000; // S_IFMT
    private const uint BlockDeviceType = 0x6000; // S_IFBLK

    [LibraryImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static partial long LSeek(int fd, long offset, int whence);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static partial int FAllocate(int fd, int mode, long offset, long length);

    [LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    private static partial int FDataSync(int fd);

    [LibraryImport("libc", EntryPoint = "posix_fadvise")]
    private static partial int PosixFadvise(int fd, long offset, long length, int advice);

    [LibraryImport("libc", EntryPoint = "preadv2", SetLastError = true)]
    private static unsafe partial nint PReadV2(int fd, IoVector* iov, int count, long offset, int flags);

    [LibraryImport("libc", EntryPoint = "pwritev2", SetLastError = true)]
    private static unsafe partial nint PWriteV2(int fd, IoVector* iov, int count, long offset, int flags);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static unsafe partial int Fcntl(int fd, int command, FileLockRegion* region);

    [LibraryImport("libc", EntryPoint = "fstat", SetLastError = true)]
    private static unsafe partial int FStat(int fd, byte* buffer);

    /// <summary>lseek; returns the new offset or -errno.</summary>
    public static long Seek(SafeFileHandle handle, long offset, int whence)
    {
        using var fd = new FdLease(handle);
        var result = LSeek(fd.Fd, offset, whence);
        return result >= 0 ? result : -Marshal.GetLastPInvokeError();
    }

    /// <summary>preadv2 with <paramref name="flags"/> (RWF_*); returns the bytes read or -errno.</summary>
    public static unsafe long Read(SafeFileHandle handle, Span<byte> destination, long offset, int flags)
    {
        using var fd = new FdLease(handle);
        fixed (byte* pointer = destination)
        {
            var vector = new IoVector { Base = pointer, Length = (nuint)destination.Length };
            var result = PReadV2(fd.Fd, &vector, 1, offset, flags);
            return result >= 0 ? result : -Marshal.GetLastPInvokeError();
        }
    }

    /// <summary>pwritev2 with <paramref name="flags"/> (RWF_*); returns the bytes written or -errno.</summary>
    public static unsafe long Write(SafeFileHandle handle, ReadOnlySpan<byte> source, long offset, int flags)
    {
        using var fd = new FdLease(handle);
        fixed (byte* pointer = source)
        {
            var vector = new IoVector { Base = pointer, Length = (nuint)source.Length };
            var result = PWriteV2(fd.Fd, &vector, 1, offset, flags);
            return result >= 0 ? result : -Marshal.GetLastPInvokeError();
        }
    }

    /// <summary>fallocate; returns 0 or errno. Retries on EINTR.</summary>
    /// <summary>
    /// An open file description lock on [<paramref name="start"/>, +<paramref name="length"/>): F_OFD_SETLK of
    /// <paramref name="type"/> (0 read, 1 write, 2 unlock), or with <paramref name="test"/> F_OFD_GETLK, which
    /// sets <paramref name="type"/> to the type of a conflicting lock held through another open file (2: none).
    /// Returns 0 or the errno.
    /// </summary>
    public static unsafe int OfdLock(SafeFileHandle handle, bool test, ref short type, long start, long length)
    {
        using var fd = new FdLease(handle);
        var region = new FileLockRegion { Type = type, Start = start, Length = length };
        if (Fcntl(fd.Fd, test ? 36 : 37, &region) != 0)
        {
            return Marshal.GetLastPInvokeError();
        }

        type = region.Type;
        return 0;
    }

    public static int Allocate(SafeFileHandle handle, int mode, long offset, long length)
    {
        using var fd = new FdLease(handle);
        for (var attempt = 0; attempt < 100; attempt++)
        {
            if (FAllocate(fd.Fd, mode, offset, length) == 0)
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

    /// <summary>fdatasync; throws a <see cref="BlockDeviceException"/> on failure.</summary>
    public static void DataSync(SafeFileHandle handle)
    {
        using var fd = new FdLease(handle);
        var errno = Errno.EINTR;
        for (var attempt = 0; attempt < 100 && errno == Errno.EINTR; attempt++)
        {
            errno = FDataSync(fd.Fd) == 0 ? 0 : Marshal.GetLastPInvokeError();
        }

        if (errno != 0)
        {
            throw new BlockDeviceException(Errno.ToNbdError(errno), $"fdatasync failed: {Marshal.GetPInvokeErrorMessage(errno)}");
        }
    }

    public static void AdviseWillNeed(SafeFileHandle handle, long offset, long length)
    {
        using var fd = new FdLease(handle);
        _ = PosixFadvise(fd.Fd, offset, length, PosixFadvWillNeed);
    }

    /// <summary>Whether the handle is a block device (fstat's st_mode is S_IFBLK).</summary>
    public static unsafe bool IsBlockDevice(SafeFileHandle handle)
    {
        // st_mode sits at byte 24 of struct stat on x86-64 and at byte 16 on arm64 (asm-generic layout).
        var modeOffset = RuntimeInformation.ProcessArchitecture switch
        {
            Architecture.X64 => 24,
            Architecture.Arm64 => 16,
            _ => -1,
        };
        if (modeOffset < 0)
        {
            return false;
        }

        var buffer = stackalloc byte[256];
        using var fd = new FdLease(handle);
        if (FStat(fd.Fd, buffer) != 0)
        {
            return false;
        }

        var mode = *(uint*)(buffer + modeOffset);
        return (mode & FileTypeMask) == BlockDeviceType;
    }

    [StructLayout(LayoutKind.Sequential)]
    private unsafe struct IoVector
    {
        public byte* Base;
        public nuint Length;
    }

    /// <summary>Keeps the handle's descriptor from being closed and reused while a raw system call uses it.</summary>
    private readonly ref struct FdLease
    {
        private readonly SafeFileHandle _handle;
        private readonly bool _added;

        public FdLease(SafeFileHandle handle)
        {
            _handle = handle;
            handle.DangerousAddRef(ref _added);
            Fd = (int)handle.DangerousGetHandle();
        }

        public int Fd { get; }

        public void Dispose()
        {
            if (_added)
            {
                _handle.DangerousRelease();
            }
        }
    }

    /// <summary>struct flock (64-bit Linux): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct FileLockRegion
    {
        public short Type;
        public short Whence;
        public long Start;
        public long Length;
        public int Pid;
    }
}
