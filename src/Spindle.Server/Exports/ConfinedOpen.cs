using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Spindle.Server.Exports;

/// <summary>
/// Opens files strictly beneath a directory with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS): the kernel itself
/// refuses any path, symlink or race that would leave the directory, so a client's export name can never reach a
/// file outside it.
/// </summary>
internal static unsafe partial class ConfinedOpen
{
    private const long SysOpenat2 = 437; // x86-64 and arm64 share the number
    private const int ODirectory = 0x10000;
    private const int OPath = 0x200000;
    private const int OCloexec = 0x80000;
    private const int ONofollow = 0x20000;
    private const int ORdonly = 0;
    private const int ORdwr = 2;
    private const ulong ResolveNoMagicLinks = 0x02;
    private const ulong ResolveBeneath = 0x08;


    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "syscall", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial long Openat2(long number, int directory, string path, OpenHow* how, nuint size);

    [LibraryImport("libc", EntryPoint = "close")]
    private static partial int Close(int fd);

    /// <summary>Opens a directory for use as the root of confined opens. Returns -errno on failure.</summary>
    public static int OpenDirectory(string path)
    {
        var fd = Open(path, ODirectory | OPath | OCloexec);
        return fd >= 0 ? fd : -Marshal.GetLastPInvokeError();
    }

    public static void CloseDirectory(int fd) => _ = Close(fd);

    /// <summary>Opens <paramref name="relative"/> beneath the directory <paramref name="directory"/>; -errno on failure.</summary>
    public static SafeFileHandle? OpenBeneath(int directory, string relative, bool readOnly, out int errno)
    {
        var how = new OpenHow
        {
            Flags = (ulong)((readOnly ? ORdonly : ORdwr) | OCloexec),
            Resolve = ResolveBeneath | ResolveNoMagicLinks,
        };
        var fd = Openat2(SysOpenat2, directory, relative, &how, (nuint)sizeof(OpenHow));
        if (fd >= 0)
        {
            errno = 0;
            return new SafeFileHandle((nint)fd, ownsHandle: true);
        }

        errno = Marshal.GetLastPInvokeError();
        return null;
    }

    /// <summary>Whether <paramref name="relative"/> names a directory beneath <paramref name="directory"/> (for listings).</summary>
    public static int OpenDirectoryBeneath(int directory, string relative)
    {
        var how = new OpenHow { Flags = (ulong)(ODirectory | OPath | OCloexec | ONofollow), Resolve = ResolveBeneath | ResolveNoMagicLinks };
        var fd = Openat2(SysOpenat2, directory, relative, &how, (nuint)sizeof(OpenHow));
        return fd >= 0 ? (int)fd : -Marshal.GetLastPInvokeError();
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct OpenHow
    {
        public ulong Flags;
        public ulong Mode;
        public ulong Resolve;
    }
}
