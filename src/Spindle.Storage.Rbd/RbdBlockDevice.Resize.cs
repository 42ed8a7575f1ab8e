using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Spindle.Storage.Rbd.Native;

namespace Spindle.Storage.Rbd;

/// <summary>
/// Online resize: an image grown (or shrunk) with <c>rbd resize</c> while it is served. librbd's header watch tells
/// this process when another client changed the header (rbd_update_watch); a timer re-reads the size as well, in case
/// a notification was missed. Either way the new size only reaches <see cref="Size"/>: NBD has no way to tell a
/// connected client that the size changed, so connections already open keep the size they negotiated (the server
/// bounds each connection's requests by that), and new connections negotiate the new one.
/// </summary>
/// <remarks>
/// Only a writable open follows a resize; a read-only one (or a snapshot) keeps the size it was opened with.
/// A shrink is logged as a warning: data past the new end is gone in the cluster, and requests there fail (the
/// server answers them with an NBD error, librbd with -EINVAL); nothing else is affected.
/// </remarks>
public sealed partial class RbdBlockDevice
{
    /// <summary>Bounds the loop that re-reads the size while notifications keep arriving.</summary>
    private const int MaxRefreshRounds = 64;

    private readonly ILogger _logger;
    private Timer? _sizeTimer;
    private GCHandle _watchHandle;
    private ulong _watch;
    private bool _watching;

    /// <summary>Re-reads requested and not yet done: the first requester runs them, the others only count.</summary>
    private int _refreshRequests;

    /// <summary>What last made the size be re-read ("header watch" or "timer"), for the log line.</summary>
    private string _refreshCause = "timer";

    private long _sizeChanges;

    /// <summary>How many times the size was seen to change since the image was opened.</summary>
    public long SizeChanges => Interlocked.Read(ref _sizeChanges);

    /// <summary>Registers the header watch and starts the timer; neither failing stops the image being served.</summary>
    private void StartSizeTracking(RbdOptions options)
    {
        if (_readOnly)
        {
            // A snapshot is immutable: its size never changes. A read-only open of the image itself has no header
            // watch in librbd (rbd_aio_open_read_only), so nothing tells it about a resize: rbd_get_size goes on
            // answering from the header read at the open, and I/O is clipped to it. It keeps its size until reopened
            // (docs/rbd.md).
            return;
        }

        if (options.WatchHeader)
        {
            Watch();
        }

        if (options.SizeCheckInterval > TimeSpan.Zero)
        {
            _sizeTimer = new Timer(static state => ((RbdBlockDevice)state!).RequestRefresh("timer"), this,
                options.SizeCheckInterval, options.SizeCheckInterval);
        }
    }

    private unsafe void Watch()
    {
        _watchHandle = GCHandle.Alloc(this, GCHandleType.Weak);
        var result = LibRbd.UpdateWatch(_image, out _watch, &OnHeaderUpdate, GCHandle.ToIntPtr(_watchHandle));
        if (result < 0)
        {
            _watchHandle.Free();
            RbdLog.WatchFailed(_logger, _description, RbdErrors.Describe(-result));
        }
        else
        {
            _watching = true;
        }
    }

    /// <summary>rbd_update_watch's callback, on a librbd thread: the size is read on the pool, never here.</summary>
    [UnmanagedCallersOnly]
    private static void OnHeaderUpdate(nint argument)
    {
        if (GCHandle.FromIntPtr(argument).Target is RbdBlockDevice device)
        {
            ThreadPool.UnsafeQueueUserWorkItem(static d => d.RequestRefresh("header watch"), device, preferLocal: false);
        }
    }

    /// <summary>
    /// Re-reads the size now, on the calling thread. One caller reads at a time; a request made meanwhile makes that
    /// caller read once more instead of waiting.
    /// </summary>
    internal void RequestRefresh(string cause)
    {
        Volatile.Write(ref _refreshCause, cause);
        if (Interlocked.Increment(ref _refreshRequests) != 1)
        {
            return;
        }

        for (var round = 0; round < MaxRefreshRounds; round++)
        {
            var seen = Volatile.Read(ref _refreshRequests);
            ReadSize(Volatile.Read(ref _refreshCause));
            if (Interlocked.Add(ref _refreshRequests, -seen) == 0)
            {
                return;
            }
        }

        // Notifications without end: stop here; the next one (or the timer) starts afresh.
        Volatile.Write(ref _refreshRequests, 0);
    }

    private void ReadSize(string cause)
    {
        try
        {
            // Counted as a request, so closing the image waits for it (rbd_get_size on a closed image is a crash).
            EnterRequest();
        }
        catch (BlockDeviceException)
        {
            return;
        }

        try
        {
            var result = LibRbd.GetSize(_image, out var read);
            if (result < 0)
            {
                RbdLog.SizeReadFailed(_logger, _description, RbdErrors.Describe(-result));
                return;
            }

            var size = (long)Math.Min(read, long.MaxValue);
            var old = Interlocked.Exchange(ref _size, size);
            if (old == size)
            {
                return;
            }

            Interlocked.Increment(ref _sizeChanges);
            if (size > old)
            {
                RbdLog.Grew(_logger, _description, old, size, cause);
            }
            else
            {
                RbdLog.Shrank(_logger, _description, old, size, cause);
            }
        }
        finally
        {
            FinishRequest();
        }
    }

    private async ValueTask StopSizeTimerAsync()
    {
        if (_sizeTimer is { } timer)
        {
            // Waits for a tick in progress; a tick after this finds the device closing and reads nothing.
            await timer.DisposeAsync().ConfigureAwait(false);
        }
    }

    /// <summary>rbd_update_unwatch; called before rbd_close, on the thread that closes.</summary>
    private void StopWatching(nint image)
    {
        if (!_watching)
        {
            return;
        }

        _watching = false;
        var result = LibRbd.UpdateUnwatch(image, _watch);
        if (result < 0)
        {
            RbdLog.UnwatchFailed(_logger, _description, RbdErrors.Describe(-result));
        }

        _watchHandle.Free();
    }
}

/// <summary>The RBD backend's log lines.</summary>
internal static partial class RbdLog
{
    [LoggerMessage(EventId = 3001, Level = LogLevel.Information,
        Message = "{Image} grew from {OldSize} to {NewSize} bytes (seen by the {Cause}): new connections get the new size; open ones keep theirs")]
    public static partial void Grew(ILogger logger, string image, long oldSize, long newSize, string cause);

    [LoggerMessage(EventId = 3002, Level = LogLevel.Warning,
        Message = "{Image} shrank from {OldSize} to {NewSize} bytes (seen by the {Cause}): the data past the new end is gone; requests there now fail")]
    public static partial void Shrank(ILogger logger, string image, long oldSize, long newSize, string cause);

    [LoggerMessage(EventId = 3003, Level = LogLevel.Warning,
        Message = "{Image}: cannot watch the image header ({Reason}); a resize is seen by the size timer only")]
    public static partial void WatchFailed(ILogger logger, string image, string reason);

    [LoggerMessage(EventId = 3004, Level = LogLevel.Warning, Message = "{Image}: cannot re-read the size: {Reason}")]
    public static partial void SizeReadFailed(ILogger logger, string image, string reason);

    [LoggerMessage(EventId = 3005, Level = LogLevel.Warning, Message = "{Image}: rbd_update_unwatch failed: {Reason}")]
    public static partial void UnwatchFailed(ILogger logger, string image, string reason);
}
