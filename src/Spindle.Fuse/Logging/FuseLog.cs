using Microsoft.Extensions.Logging;

namespace Spindle.Fuse.Logging;

/// <summary>Every log message of the device layer, with a stable event id and the mount point.</summary>
internal static partial class FuseLog
{
    [LoggerMessage(1, LogLevel.Information, "{MountPoint}: mounted {File} ({Size} bytes, {Access}) from {Device} via {Mounter}")]
    public static partial void Mounted(ILogger logger, string mountPoint, string file, long size, string access, string device, string mounter);

    [LoggerMessage(2, LogLevel.Debug, "{MountPoint}: kernel FUSE {KernelMajor}.{KernelMinor}, speaking 7.{Minor}; max_write {MaxWrite}, max_pages {MaxPages}, flags {Flags}")]
    public static partial void Initialized(ILogger logger, string mountPoint, uint kernelMajor, uint kernelMinor, uint minor, uint maxWrite, int maxPages, string flags);

    [LoggerMessage(3, LogLevel.Information, "{MountPoint}: unmounted")]
    public static partial void Unmounted(ILogger logger, string mountPoint);

    [LoggerMessage(4, LogLevel.Warning, "{MountPoint}: replacing a stale Spindle mount (its server is gone)")]
    public static partial void RecoveringStaleMount(ILogger logger, string mountPoint);

    [LoggerMessage(5, LogLevel.Warning, "{MountPoint}: {Operation} at {Offset} (+{Length}) failed with {Errno}: {Reason}")]
    public static partial void OperationFailed(ILogger logger, string mountPoint, string operation, long offset, long length, string errno, string reason);

    [LoggerMessage(6, LogLevel.Warning, "{MountPoint}: still in use ({Handles} open handles); detached it, serving until the last user closes it")]
    public static partial void BusyDetached(ILogger logger, string mountPoint, int handles);

    [LoggerMessage(7, LogLevel.Warning, "{MountPoint}: aborting the FUSE connection; users of the file now get errors")]
    public static partial void Aborting(ILogger logger, string mountPoint);

    [LoggerMessage(8, LogLevel.Error, "{MountPoint}: reading /dev/fuse failed with {Errno}; the session ends")]
    public static partial void DeviceReadFailed(ILogger logger, string mountPoint, string errno);

    [LoggerMessage(9, LogLevel.Warning, "{MountPoint}: malformed {Opcode} request ({Length} bytes)")]
    public static partial void MalformedRequest(ILogger logger, string mountPoint, string opcode, int length);

    [LoggerMessage(10, LogLevel.Error, "{MountPoint}: writing a reply failed with {Errno}")]
    public static partial void ReplyFailed(ILogger logger, string mountPoint, string errno);

    [LoggerMessage(11, LogLevel.Error, "{MountPoint}: flushing the device at unmount failed")]
    public static partial void FinalFlushFailed(ILogger logger, string mountPoint, Exception exception);

    [LoggerMessage(12, LogLevel.Error, "{MountPoint}: the kernel speaks FUSE {Major}.{Minor}; 7.{Required} or newer is needed")]
    public static partial void KernelTooOld(ILogger logger, string mountPoint, uint major, uint minor, uint required);

    [LoggerMessage(13, LogLevel.Error, "{MountPoint}: unexpected failure handling {Opcode}")]
    public static partial void HandlerFailed(ILogger logger, string mountPoint, string opcode, Exception exception);

    [LoggerMessage(14, LogLevel.Information, "{MountPoint}: {File} grew from {OldSize} to {NewSize} bytes with its device (kernel told: {Notice})")]
    public static partial void FileGrew(ILogger logger, string mountPoint, string file, long oldSize, long newSize, string notice);
}
