using Spindle.Fuzz.Targets;
using Xunit;

namespace Spindle.Fuzz.Tests;

/// <summary>Timers are counted process-wide, so this runs alone.</summary>
[CollectionDefinition(nameof(ClientRegressionTests), DisableParallelization = true)]
public sealed class ClientRegressionCollection;

/// <summary>
/// Bugs the client fuzz targets found. A failed connection kept its request-timeout timer running: the client drops
/// a failed connection without disposing it, and the timer kept the connection, its buffers and its requests alive
/// for good (about 10 KB and a tick a second per lost connection; the ClientReplies fuzzer's process grew past 1 GB
/// and stalled into false hangs). Input: Regressions/ClientReplies/failed-connection-timer.
/// </summary>
[Collection(nameof(ClientRegressionTests))]
public sealed class ClientRegressionTests
{
    [Fact]
    public void A_connection_that_fails_leaves_no_timer_running()
    {
        var target = new ClientReplies();
        byte[] badMagic = [0, 0x1f, 0, 0, 0];
        target.Run(badMagic);
        var before = Timer.ActiveCount;
        for (var i = 0; i < 40; i++)
        {
            target.Run(badMagic);
        }

        // One leaked timer per failed connection before the fix (40 here); a few may be between ticks of other code.
        var leaked = Timer.ActiveCount - before;
        Assert.True(leaked < 10, $"{leaked} more timers running after 40 failed connections");
    }
}
