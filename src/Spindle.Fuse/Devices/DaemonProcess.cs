using System.Runtime.InteropServices;
using Spindle.Fuse.Native;
using Spindle.Protocol;

namespace Spindle.Fuse.Devices;

/// <summary>The process calls a background mount server (spindle attach) needs, which .NET does not expose.</summary>
public static class DaemonProcess
{
    public const int SigKill = 9;
    public const int SigTerm = 15;

    /// <summary>Whether the caller is root (loop devices and mount(2) need it).</summary>
    public static bool IsRoot => LibC.GetEffectiveUserId() == 0;

    /// <summary>This process's id.</summary>
    public static int CurrentId => LibC.GetProcessId();

    /// <summary>
    /// Leaves the terminal's session (setsid), so closing the terminal or a Ctrl-C in it no longer signals this
    /// process. Fails harmlessly (false) for a process group leader.
    /// </summary>
    public static bool StartNewSession() => LibC.SetSid() >= 0;

    /// <summary>Whether process <paramref name="pid"/> exists and has not exited (a zombie waiting to be reaped has).</summary>
    public static bool IsAlive(int pid)
    {
        if (pid <= 0 || (LibC.Kill(pid, 0) != 0 && Marshal.GetLastPInvokeError() != Errno.EPERM))
        {
            return false;
        }

        try
        {
            // /proc/PID/stat: "pid (comm) S ...", the state letter after the last ')'.
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            var end = stat.LastIndexOf(')');
            return end < 0 || end + 2 >= stat.Length || stat[end + 2] is not ('Z' or 'X');
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <summary>Sends <paramref name="signal"/> to <paramref name="pid"/>; false if there is no such process.</summary>
    public static bool Signal(int pid, int signal) => pid > 0 && LibC.Kill(pid, signal) == 0;

    /// <summary>The arguments process <paramref name="pid"/> was started with (/proc/PID/cmdline), or empty.</summary>
    public static IReadOnlyList<string> CommandLine(int pid)
    {
        try
        {
            var raw = File.ReadAllText($"/proc/{pid}/cmdline");
            return raw.Split('\0', StringSplitOptions.RemoveEmptyEntries);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return [];
        }
    }
}
