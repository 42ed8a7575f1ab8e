using System.Runtime.InteropServices;

namespace Spindle.Devices.Native;

/// <summary>Whether a block device is held: an exclusive open (O_EXCL) fails with EBUSY while a file system is mounted on it, it is swap, or a device mapper holds it.</summary>
public static partial class DeviceUse
{
    private const int OReadOnly = 0;
    private const int OExclusive = 0x80;
    private const int OCloseOnExec = 0x80000;
    private const int EBusy = 16;

    public static bool IsHeldExclusively(string device)
    {
        var fd = Open(device, OReadOnly | OExclusive | OCloseOnExec);
        if (fd >= 0)
        {
            Close(fd);
            return false;
        }

        return Marshal.GetLastPInvokeError() == EBusy;
    }

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int Close(int fd);
}
