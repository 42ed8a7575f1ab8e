using System.Globalization;
using System.Net.Sockets;
using System.Text;

namespace Spindle.Cli.Hosting.Systemd;

/// <summary>
/// sd_notify(3) without libsystemd: one datagram per state change to the Unix socket named by <c>NOTIFY_SOCKET</c>
/// (a leading '@' is the abstract namespace). READY=1 once serving, RELOADING=1 and READY=1 around a reload,
/// STOPPING=1, STATUS= lines, and WATCHDOG=1 every half <c>WATCHDOG_USEC</c> when the unit sets WatchdogSec=.
/// Without NOTIFY_SOCKET (not started by systemd) every call does nothing.
/// </summary>
internal sealed class SystemdNotifier : IDisposable
{
    private readonly Socket? _socket;
    private readonly UnixDomainSocketEndPoint? _target;
    private readonly Timer? _watchdog;
    private readonly Lock _lock = new();
    private string? _lastStatus;

    private SystemdNotifier(string? path, TimeSpan? watchdog, Func<bool>? healthy)
    {
        if (string.IsNullOrEmpty(path))
        {
            return;
        }

        // "@name" is Linux's abstract namespace: the address starts with a NUL byte.
        _target = new UnixDomainSocketEndPoint(path[0] == '@' ? "\0" + path[1..] : path);
        _socket = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        if (watchdog is { } interval && interval > TimeSpan.Zero)
        {
            // sd_watchdog_enabled(3): ping at half the interval, so one late tick is not a miss.
            var period = interval / 2;
            WatchdogInterval = interval;
            _watchdog = new Timer(_ =>
            {
                if (healthy?.Invoke() ?? true)
                {
                    Send("WATCHDOG=1");
                }
            }, null, TimeSpan.Zero, period);
        }
    }

    /// <summary>Whether a service manager listens (NOTIFY_SOCKET was set).</summary>
    public bool IsActive => _socket is not null;

    /// <summary>The unit's WatchdogSec=, when it asked for pings.</summary>
    public TimeSpan? WatchdogInterval { get; }

    /// <summary>
    /// Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (the watchdog is ours only if WATCHDOG_PID is unset or is
    /// this process), and removes them from the environment so programs started later do not notify in our name.
    /// </summary>
    /// <param name="healthy">Asked before each watchdog ping: false skips it, and systemd restarts a stuck service.</param>
    public static SystemdNotifier FromEnvironment(Func<bool>? healthy = null)
    {
        var path = Environment.GetEnvironmentVariable("NOTIFY_SOCKET");
        TimeSpan? watchdog = null;
        if (ulong.TryParse(Environment.GetEnvironmentVariable("WATCHDOG_USEC"), NumberStyles.None, CultureInfo.InvariantCulture, out var usec) && usec > 0)
        {
            var pid = Environment.GetEnvironmentVariable("WATCHDOG_PID");
            if (string.IsNullOrEmpty(pid) || pid == Environment.ProcessId.ToString(CultureInfo.InvariantCulture))
            {
                watchdog = TimeSpan.FromMicroseconds(usec);
            }
        }

        foreach (var name in new[] { "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID" })
        {
            Environment.SetEnvironmentVariable(name, null);
        }

        return new SystemdNotifier(path, watchdog, healthy);
    }

    /// <summary>READY=1 with the main PID and a status line.</summary>
    public void Ready(string status) => Send($"READY=1\nMAINPID={Environment.ProcessId}\nSTATUS={status}");

    /// <summary>
    /// RELOADING=1 with the CLOCK_MONOTONIC time (systemd 253's Type=notify-reload wants MONOTONIC_USEC to match the
    /// reload to its READY=1; older versions ignore it).
    /// </summary>
    public void Reloading() => Send($"RELOADING=1\nMONOTONIC_USEC={MonotonicMicroseconds()}\nSTATUS=Reloading the configuration");

    public void Stopping() => Send("STOPPING=1\nSTATUS=Stopping: finishing in-flight requests");

    /// <summary>A STATUS= line, sent only when it changed.</summary>
    public void Status(string status)
    {
        lock (_lock)
        {
            if (status == _lastStatus)
            {
                return;
            }

            _lastStatus = status;
        }

        Send("STATUS=" + status);
    }

    public void Dispose()
    {
        _watchdog?.Dispose();
        _socket?.Dispose();
    }

    private void Send(string message)
    {
        if (_socket is null)
        {
            return;
        }

        try
        {
            _socket.SendTo(Encoding.UTF8.GetBytes(message), _target!);
        }
        catch (SocketException)
        {
            // The manager went away (or never was): notifications are advisory.
        }
        catch (ObjectDisposedException)
        {
        }
    }

    private static long MonotonicMicroseconds() => (long)(System.Diagnostics.Stopwatch.GetTimestamp() / (System.Diagnostics.Stopwatch.Frequency / 1_000_000.0));
}
