using System.Diagnostics;

namespace Spindle.Wire;

/// <summary>
/// Decides, before each blocking receive, whether to poll the socket for a while first, and learns from the outcome.
/// Polling pays when the next message arrives within the window: the thread never sleeps, so the peer is spared a
/// wake-up (tens of microseconds of latency, and the scheduler's CPU on both sides). It is pure cost when the peer is
/// slower than the window: every receive then burns the whole window and sleeps anyway. So a window that expires empty
/// turns polling off for the next 1, 2, 4 ... 64 receives (each later miss doubles it), and the next probe after that
/// tries again; one receive whose data arrived in time resets the back-off. A connection whose client keeps pace
/// polls on every receive; one whose client pauses between requests almost never does.
/// </summary>
/// <remarks>Owned by one receiving thread: no synchronisation.</remarks>
internal struct ReceivePoller
{
    /// <summary>The longest run of receives that skip polling after repeated misses.</summary>
    internal const int MaxBackoff = 64;

    private int _skip;
    private int _backoff;

    /// <summary>Receives that found data within the window (for tests and diagnostics).</summary>
    internal long Hits { get; private set; }

    /// <summary>Windows that expired empty.</summary>
    internal long Misses { get; private set; }

    /// <summary>Receives that went straight to sleep because of the back-off.</summary>
    internal long Skipped { get; private set; }

    /// <summary>
    /// Polls with <paramref name="ready"/> (a poll with no timeout) until it says data is there or
    /// <paramref name="window"/> ends; returns whether it did. Bounded by the window and by 1000 probes.
    /// </summary>
    internal bool Poll<TState>(TimeSpan window, TState state, Func<TState, bool> ready)
    {
        if (window <= TimeSpan.Zero)
        {
            return false;
        }

        if (_skip > 0)
        {
            _skip--;
            Skipped++;
            return false;
        }

        var deadline = Stopwatch.GetTimestamp() + (long)(window.TotalSeconds * Stopwatch.Frequency);
        for (var attempt = 0; attempt < 1000; attempt++)
        {
            if (ready(state))
            {
                Hits++;
                _backoff = 0;
                return true;
            }

            if (Stopwatch.GetTimestamp() > deadline)
            {
                break;
            }

            Thread.SpinWait(8);
        }

        Misses++;
        _backoff = Math.Min(Math.Max(1, _backoff * 2), MaxBackoff);
        _skip = _backoff;
        return false;
    }
}
