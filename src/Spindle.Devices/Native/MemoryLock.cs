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
    /// <summary>
    /// mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): every page this process has touched, and every page it
    /// touches later, stays resident. MCL_ONFAULT keeps the runtime's large reservations (GC regions, thread stacks)
    /// from being populated in full: without it a .NET process locks around 85 MiB instead of what it uses. Logs the
    /// outcome.
    /// </summary>
    public static bool LockAll(ILogger logger)
    {
        ArgumentNullException.ThrowIfNull(logger);
        if (LibC.MLockAll(LibC.MclCurrent | LibC.MclFuture | LibC.MclOnFault) == 0)
        {
            DevicesLog.MemoryLocked(logger);
            return true;
        }

        DevicesLog.MemoryLockFailed(logger, Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError()));
        return false;
    }

    /// <summary>
    /// Tells the OOM killer to spare this process (oom_score_adj -1000): killing the daemon of a swap device to
    /// free memory would leave the pages on it unreachable.
    /// </summary>
    public static void ExemptFromOomKiller()
    {
        try
        {
            File.WriteAllText("/proc/self/oom_score_adj", "-1000");
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            // Not root, or no procfs: the memory lock still keeps the daemon resident.
        }
    }
}
