using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Spindle.Devices.Logging;

namespace Spindle.Devices.Native;

/// <summary>
/// Keeps this process in memory: a daemon that serves (or repairs) a block device the kernel may swap to must never
/// wait for its own pages to come back from that device.
/// </summary>
public static class MemoryLock
{
    /// <summary>mlockall(MCL_CURRENT | MCL_FUTURE): every page now and every page later stays resident. Logs the outcome.</summary>
    public static bool LockAll(ILogger logger)
    {
        ArgumentNullException.ThrowIfNull(logger);
        if (LibC.MLockAll(LibC.MclCurrent | LibC.MclFuture) == 0)
        {
            DevicesLog.MemoryLocked(logger);
            return true;
        }

        DevicesLog.MemoryLockFailed(logger, Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError()));
        return false;
    }
}
