using System.Runtime.InteropServices;

namespace Spindle.Fuse.Native;

/// <summary>
/// The Linux system calls the device layer needs and .NET does not expose: /dev/fuse I/O on pinned buffers,
/// mount(2)/umount2(2), descriptor passing for fusermount3, and the few process calls a daemon needs.
/// Every wrapper returns the raw result; callers read errno with <see cref="Marshal.GetLastPInvokeError"/>.
/// </summary>
internal static unsafe partial class LibC
{
    public const int ORdOnly = 0x0;
    public const int OWrOnly = 0x1;
    public const int ORdWr = 0x2;
    public const int OCreat = 0x40;
    public const int OExcl = 0x80;
    public const int OAppend = 0x400;
    public const int OCloExec = 0x80000;

    public const ulong MsRdOnly = 1;
    public const ulong MsNoSuid = 2;
    public const ulong MsNoDev = 4;

    public const int MntForce = 1;
    public const int MntDetach = 2;

    public const int FOk = 0;
    public const int FSetFd = 2;

    public const int AfUnix = 1;
    public const int SockStream = 1;
    public const int SockCloExec = 0x80000;
    public const int SolSocket = 1;
    public const int ScmRights = 1;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Open(string path, int flags, uint mode);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "read", SetLastError = true)]
    public static partial nint Read(int fd, byte* buffer, nint count);

    [LibraryImport("libc", EntryPoint = "write", SetLastError = true)]
    public static partial nint Write(int fd, byte* buffer, nint count);

    [LibraryImport("libc", EntryPoint = "mount", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Mount(string source, string target, string fileSystemType, ulong flags, string data);

    [LibraryImport("libc", EntryPoint = "umount2", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Unmount(string target, int flags);

    [LibraryImport("libc", EntryPoint = "access", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Access(string path, int mode);

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Statx(int directory, string path, int flags, uint mask, byte* buffer);

    [LibraryImport("libc", EntryPoint = "geteuid")]
    public static partial uint GetEffectiveUserId();

    [LibraryImport("libc", EntryPoint = "getegid")]
    public static partial uint GetEffectiveGroupId();

    [LibraryImport("libc", EntryPoint = "getpid")]
    public static partial int GetProcessId();

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    public static partial int Kill(int pid, int signal);

    [LibraryImport("libc", EntryPoint = "setsid", SetLastError = true)]
    public static partial int SetSid();

    [LibraryImport("libc", EntryPoint = "dup", SetLastError = true)]
    public static partial int Dup(int fd);

    [LibraryImport("libc", EntryPoint = "dup2", SetLastError = true)]
    public static partial int Dup2(int fd, int target);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    public static partial int Fcntl(int fd, int command, int argument);

    [LibraryImport("libc", EntryPoint = "socketpair", SetLastError = true)]
    public static partial int SocketPair(int domain, int type, int protocol, int* fds);

    [LibraryImport("libc", EntryPoint = "recvmsg", SetLastError = true)]
    public static partial nint ReceiveMessage(int fd, MessageHeader* message, int flags);

    /// <summary>struct msghdr (x86-64 and arm64 layout).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct MessageHeader
    {
        public void* Name;
        public uint NameLength;
        public IoVector* Vectors;
        public nuint VectorCount;
        public void* Control;
        public nuint ControlLength;
        public int Flags;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct IoVector
    {
        public void* Base;
        public nuint Length;
    }

    /// <summary>struct cmsghdr, followed by its data.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct ControlMessageHeader
    {
        public nuint Length;
        public int Level;
        public int Type;
    }

    [LibraryImport("libc", EntryPoint = "realpath", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial nint RealPathNative(string path, nint resolved);

    [LibraryImport("libc", EntryPoint = "free")]
    private static partial void Free(nint pointer);

    /// <summary>realpath(3): the canonical absolute path (symbolic links resolved), or null if it cannot be resolved.</summary>
    public static string? RealPath(string path)
    {
        var resolved = RealPathNative(path, 0);
        if (resolved == 0)
        {
            return null;
        }

        try
        {
            return Marshal.PtrToStringUTF8(resolved);
        }
        finally
        {
            Free(resolved);
        }
    }

    /// <summary>Opens a file; returns the descriptor or -errno.</summary>
    public static int OpenOrErrno(string path, int flags, uint mode = 0)
    {
        var fd = Open(path, flags, mode);
        return fd >= 0 ? fd : -Marshal.GetLastPInvokeError();
    }

    /// <summary>
    /// statx with AT_STATX_FORCE_SYNC: asks the file system itself rather than the attribute cache, so a FUSE mount
    /// whose server is gone answers ENOTCONN (access(2) may be answered from the cache). Returns 0 or the errno.
    /// Blocks as long as the file system does.
    /// </summary>
    public static int StatForceSyncErrno(string path)
    {
        const int AtFdCwd = -100;
        const int AtStatxForceSync = 0x2000;
        const uint StatxType = 1;
        var buffer = stackalloc byte[256];
        return Statx(AtFdCwd, path, AtStatxForceSync, StatxType, buffer) == 0 ? 0 : Marshal.GetLastPInvokeError();
    }

    /// <summary>access(path, F_OK): 0 or the errno.</summary>
    public static int ProbeErrno(string path) => Access(path, FOk) == 0 ? 0 : Marshal.GetLastPInvokeError();
}
