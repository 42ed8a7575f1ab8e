using Xunit;

namespace Spindle.Wire.Tests;

/// <summary>The adaptive poll before a blocking receive: polls while data keeps arriving in time, backs off when not.</summary>
public sealed class ReceivePollerTests
{
    private static readonly TimeSpan Window = TimeSpan.FromMicroseconds(50);

    [Fact]
    public void A_peer_that_keeps_pace_is_polled_for_on_every_receive()
    {
        var poller = new ReceivePoller();
        var probes = 0;
        for (var i = 0; i < 100; i++)
        {
            Assert.True(poller.Poll(Window, 0, _ => ++probes > 0));
        }

        Assert.Equal(100, poller.Hits);
        Assert.Equal(0, poller.Misses);
        Assert.Equal(0, poller.Skipped);
        Assert.Equal(100, probes);
    }

    [Fact]
    public void Empty_windows_double_the_receives_that_skip_polling_up_to_the_limit()
    {
        var poller = new ReceivePoller();
        var polled = new List<bool>();
        for (var i = 0; i < 400; i++)
        {
            var probes = 0;
            poller.Poll(TimeSpan.FromMicroseconds(1), 0, _ => ++probes < 0);
            polled.Add(probes > 0);
        }

        // Probes at receive 0, then after skipping 1, 2, 4, ... 64, 64, ...: the gaps between probes.
        var probeIndexes = polled.Select((p, i) => (p, i)).Where(x => x.p).Select(x => x.i).ToList();
        var gaps = probeIndexes.Zip(probeIndexes.Skip(1), (a, b) => b - a - 1).ToList();
        Assert.Equal([1, 2, 4, 8, 16, 32, 64, 64, 64], gaps.Take(9));
        Assert.All(gaps, g => Assert.True(g <= ReceivePoller.MaxBackoff));
        Assert.Equal(probeIndexes.Count, poller.Misses);
        Assert.Equal(400 - probeIndexes.Count, poller.Skipped);
    }

    [Fact]
    public void Data_in_time_after_misses_resets_the_back_off()
    {
        var poller = new ReceivePoller();
        var tiny = TimeSpan.FromMicroseconds(1);
        poller.Poll(tiny, 0, _ => false); // miss: skip 1
        poller.Poll(tiny, 0, _ => throw new InvalidOperationException("skipped receives must not probe"));
        poller.Poll(tiny, 0, _ => false); // miss: skip 2
        Assert.False(poller.Poll(tiny, 0, _ => true));
        Assert.False(poller.Poll(tiny, 0, _ => true));
        Assert.True(poller.Poll(tiny, 0, _ => true)); // the probe hits: back-off gone
        Assert.True(poller.Poll(tiny, 0, _ => true));
        Assert.Equal(2, poller.Misses);
        Assert.Equal(2, poller.Hits);
        Assert.Equal(3, poller.Skipped);
    }

    [Fact]
    public void A_window_of_zero_never_probes()
    {
        var poller = new ReceivePoller();
        Assert.False(poller.Poll(TimeSpan.Zero, 0, _ => throw new InvalidOperationException("no window, no probe")));
        Assert.Equal(0, poller.Hits + poller.Misses + poller.Skipped);
    }

    [Fact]
    public void A_window_that_expires_empty_returns_after_its_probes_run_out()
    {
        var poller = new ReceivePoller();
        var probes = 0;
        Assert.False(poller.Poll(TimeSpan.FromHours(1), 0, _ => ++probes < 0));
        Assert.Equal(1000, probes); // the probe count bounds it even when the window would not
        Assert.Equal(1, poller.Misses);
    }
}
