using System.Runtime.InteropServices;

namespace Spindle.Cli.Hosting.Native;

/// <summary>The few libc calls hosting needs: identities (privilege drop, control socket peers) and file ownership.</summary>
internal static partial class Posix
{
    private const string LibC = "libc";

    [LibraryImport(LibC, SetLastError = true)]
    public static partial int setgroups(nuint size, IntPtr list);

    [LibraryImport(LibC, SetLastError = true)]
    public static partial int setgid(uint gid);

    [LibraryImport(LibC, SetLastError = true)]
    public static partial int setuid(uint uid);

    [LibraryImport(LibC)]
    public static partial uint getuid();

    [LibraryImport(LibC)]
    public static partial uint geteuid();

    [LibraryImport(LibC)]
    public static partial uint getgid();

    [LibraryImport(LibC)]
    public static partial uint getegid();

    [LibraryImport(LibC)]
    public static partial int getgroups(int size, IntPtr list);

    [LibraryImport(LibC, SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int chown(string path, uint owner, uint group);

    /// <summary>struct passwd* (glibc): name, passwd, then uid and gid as 32-bit values.</summary>
    [LibraryImport(LibC, SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial IntPtr getpwnam(string name);

    /// <summary>struct group* (glibc): name, passwd, then gid.</summary>
    [LibraryImport(LibC, SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial IntPtr getgrnam(string name);

    [LibraryImport(LibC, SetLastError = true)]
    public static partial IntPtr getpwuid(uint uid);

    /// <summary>The message for the last error of a call made with SetLastError.</summary>
    public static string LastError() => Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError());
}
