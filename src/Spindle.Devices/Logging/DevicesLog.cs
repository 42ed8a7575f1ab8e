using Microsoft.Extensions.Logging;

namespace Spindle.Devices.Logging;

/// <summary>Every log message of the kernel device, with a stable event id and the device.</summary>
internal static partial class DevicesLog
{
    [LoggerMessage(1, LogLevel.Information, "{Device}: attached ({Mode}, {Server}): {Size} bytes, block size {BlockSize}, {Connections} connection(s), request timeout {IoTimeout} s, dead timeout {DeadTimeout}")]
    public static partial void Attached(ILogger logger, string device, string mode, string server, long size, uint blockSize, int connections, double ioTimeout, string deadTimeout);

    [LoggerMessage(2, LogLevel.Information, "{Device}: adopted ({Mode}, {Server}, {Connections} connection(s)); watching it from now on")]
    public static partial void Adopted(ILogger logger, string device, string mode, string server, int connections);

    [LoggerMessage(3, LogLevel.Warning, "{Device}: the kernel lost a connection (LINK_DEAD); reconnecting")]
    public static partial void LinkDead(ILogger logger, string device);

    [LoggerMessage(4, LogLevel.Information, "{Device}: handed the kernel a new connection to {Server} ({Count} since start)")]
    public static partial void Reconnected(ILogger logger, string device, string server, long count);

    [LoggerMessage(5, LogLevel.Warning, "Connecting to {Server} failed (attempt {Attempt}): {Reason}; trying again")]
    public static partial void ReconnectFailed(ILogger logger, string server, int attempt, string reason);

    [LoggerMessage(6, LogLevel.Warning, "{Server} does not advertise multi-conn: one connection instead of {Wanted}")]
    public static partial void NoMultiConn(ILogger logger, string server, int wanted);

    [LoggerMessage(7, LogLevel.Information, "{Device}: disconnected")]
    public static partial void Disconnected(ILogger logger, string device);

    [LoggerMessage(8, LogLevel.Warning, "{Device}: the device was disconnected by someone else")]
    public static partial void Gone(ILogger logger, string device);

    [LoggerMessage(9, LogLevel.Information, "Memory locked (mlockall): this process is never swapped out")]
    public static partial void MemoryLocked(ILogger logger);

    [LoggerMessage(10, LogLevel.Warning, "mlockall failed ({Reason}): this process may be swapped out, which a swap device on it could deadlock")]
    public static partial void MemoryLockFailed(ILogger logger, string reason);
}
