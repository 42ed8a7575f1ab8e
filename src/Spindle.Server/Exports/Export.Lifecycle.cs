using Spindle.Server.Diagnostics;
using Spindle.Storage;

namespace Spindle.Server.Exports;

/// <summary>
/// An export's life after it is served: retirement (removed from its catalog or replaced by a changed version: the
/// connections it has drain, then its device is flushed and released) and its statistics (the connections that
/// ended, plus the live ones, so a scrape never sees a counter go down).
/// </summary>
public sealed partial class Export
{
    private readonly CancellationTokenSource _retired = new();
    private ExportStatistics _statistics = new();
    private int _releasedAfterDrain;

    /// <summary>True once the export left its catalog: new connections are refused.</summary>
    public bool IsRetired => _retired.IsCancellationRequested;

    /// <summary>
    /// Set when the export is retired with <c>drain</c>: its connections finish what they have in flight, then answer
    /// ESHUTDOWN and close (proto.md "Terminating the transmission phase": a server that is going away).
    /// </summary>
    internal CancellationToken DrainToken => _drain.Token;

    private readonly CancellationTokenSource _drain = new();

    /// <summary>
    /// Takes the export out of service. With <paramref name="drain"/> its connections are drained (an export removed);
    /// without, they carry on to their natural end (an export replaced by a changed version: changes apply to new
    /// connections). Either way the device is released once the last connection is gone.
    /// </summary>
    internal void Retire(bool drain)
    {
        _retired.Cancel();
        if (drain)
        {
            _drain.Cancel();
        }

        if (Interlocked.CompareExchange(ref _connections, -1, 0) == 0)
        {
            _ = ReleaseAfterDrainAsync();
        }
    }

    /// <summary>Completes when the export has been released after retirement.</summary>
    public Task Released => _releasedTask.Task;

    private readonly TaskCompletionSource _releasedTask = new(TaskCreationOptions.RunContinuationsAsynchronously);

    private async Task ReleaseAfterDrainAsync()
    {
        if (Interlocked.Exchange(ref _releasedAfterDrain, 1) != 0)
        {
            return;
        }

        try
        {
            if (!IsReadOnly && (Device.Features & BlockDeviceFeatures.Flush) != 0)
            {
                await Device.FlushAsync(CancellationToken.None).ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is IOException or BlockDeviceException or ObjectDisposedException)
        {
            // The data reached the device as far as the clients were told; a failing flush at release is not
            // something any client can be told about any more.
        }
        finally
        {
            await DisposeAsync().ConfigureAwait(false);
            _releasedTask.TrySetResult();
        }
    }

    /// <summary>Registers a connection's counters (it entered transmission on this export).</summary>
    internal void Attach(CommandCounters counters) => _statistics.Attach(counters);

    /// <summary>A connection ended: its counts move to the export's own, in one step, so totals never go down.</summary>
    internal void Detach(CommandCounters counters) => _statistics.Detach(counters);

    /// <summary>
    /// A changed version of an export goes on counting where the old one was (clients still on the old version
    /// included), so a reload does not reset the export's counters. Called before the new version serves anyone.
    /// </summary>
    internal void ContinueStatisticsOf(Export previous) => _statistics = previous._statistics;

    /// <summary>The statistics set, shared by the versions of one export (to count each set once).</summary>
    internal object StatisticsKey => _statistics;

    /// <summary>Everything this export (and the versions it replaced) has answered so far, added up now.</summary>
    public CommandCounters Statistics() => _statistics.Snapshot();

    /// <summary>The counters of the connections that ended and of those still open, under one lock.</summary>
    private sealed class ExportStatistics
    {
        private readonly Lock _lock = new();
        private readonly CommandCounters _ended = new();
        private readonly List<CommandCounters> _live = [];

        public void Attach(CommandCounters counters)
        {
            lock (_lock)
            {
                _live.Add(counters);
            }
        }

        public void Detach(CommandCounters counters)
        {
            lock (_lock)
            {
                if (_live.Remove(counters))
                {
                    _ended.Add(counters);
                }
            }
        }

        public CommandCounters Snapshot()
        {
            var total = new CommandCounters();
            lock (_lock)
            {
                total.Add(_ended);
                foreach (var live in _live)
                {
                    total.Add(live);
                }
            }

            return total;
        }
    }

    /// <summary>
    /// The device shared by an export and the changed versions made from it (<see cref="WithOptions"/>): disposed when
    /// the last of them is released, so a client still on the old version keeps a working device.
    /// </summary>
    private sealed class DeviceLease(BlockDevice device)
    {
        private int _holders = 1;

        public void Acquire() => Interlocked.Increment(ref _holders);

        public ValueTask ReleaseAsync() => Interlocked.Decrement(ref _holders) == 0 ? device.DisposeAsync() : ValueTask.CompletedTask;
    }
}
