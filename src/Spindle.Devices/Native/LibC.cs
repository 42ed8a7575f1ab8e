using System.Runtime.InteropServices;

namespace Spindle.Devices.Native;

/// <summary>
/// The Linux system calls the kernel device needs and .NET does not expose: netlink sockets, socket pairs, poll on
/// sockets the kernel also holds, the kernel's send timeout on a handed-over socket, and mlockall. Every wrapper
/// returns the raw result; callers read errno with <see cref="Marshal.GetLastPInvokeError"/>.
/// </summary>
internal static unsafe partial class LibC
{
    public const int AfUnix = 1;
    public const int AfNetlink = 16;
    public const int SockStream = 1;
    public const int SockRaw = 3;
    public const int SockCloExec = 0x80000;
    public const int NetlinkGeneric = 16;

    public const int SolSocket = 1;
    public const int SoSndTimeo = 21;
    public const int SolNetlink = 270;
    public const int NetlinkAddMembership = 1;

    public const short PollIn = 0x1;
    public const short PollErr = 0x8;
    public const short PollHup = 0x10;
    public const short PollNval = 0x20;
    public const short PollRdHup = 0x2000;

    public const int MclCurrent = 1;
    public const int MclFuture = 2;
    public const int MclOnFault = 4;

    public const int EIntr = 4;
    public const int EAgain = 11;
    public const int ENoBufs = 105;

    [StructLayout(LayoutKind.Sequential)]
    public struct PollFd
    {
        public int Fd;
        public short Events;
        public short ReturnedEvents;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct SockAddrNetlink
    {
        public ushort Family;
        public ushort Padding;
        public uint PortId;
        public uint Groups;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct TimeVal
    {
        public long Seconds;
        public long Microseconds;
    }

    [LibraryImport("libc", EntryPoint = "socket", SetLastError = true)]
    public static partial int Socket(int domain, int type, int protocol);

    [LibraryImport("libc", EntryPoint = "socketpair", SetLastError = true)]
    public static partial int SocketPair(int domain, int type, int protocol, int* descriptors);

    [LibraryImport("libc", EntryPoint = "bind", SetLastError = true)]
    public static partial int Bind(int fd, SockAddrNetlink* address, int length);

    [LibraryImport("libc", EntryPoint = "send", SetLastError = true)]
    public static partial nint Send(int fd, byte* buffer, nint length, int flags);

    [LibraryImport("libc", EntryPoint = "recv", SetLastError = true)]
    public static partial nint Receive(int fd, byte* buffer, nint length, int flags);

    [LibraryImport("libc", EntryPoint = "setsockopt", SetLastError = true)]
    public static partial int SetSockOpt(int fd, int level, int name, void* value, int length);

    [LibraryImport("libc", EntryPoint = "getsockopt", SetLastError = true)]
    public static partial int GetSockOpt(int fd, int level, int name, void* value, int* length);

    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    public static partial int Poll(PollFd* descriptors, nuint count, int timeoutMilliseconds);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "mlockall", SetLastError = true)]
    public static partial int MLockAll(int flags);

    /// <summary>The events <paramref name="fd"/> reports now (0 when none), without waiting.</summary>
    public static short PollNow(int fd, short events)
    {
        var entry = new PollFd { Fd = fd, Events = events };
        return Poll(&entry, 1, 0) > 0 ? entry.ReturnedEvents : (short)0;
    }

    /// <summary>SO_SNDTIMEO of a socket, in milliseconds.</summary>
    public static long SendTimeoutMilliseconds(int fd)
    {
        TimeVal value = default;
        var length = sizeof(TimeVal);
        return GetSockOpt(fd, SolSocket, SoSndTimeo, &value, &length) == 0
            ? (value.Seconds * 1000) + (value.Microseconds / 1000)
            : -1;
    }
}
