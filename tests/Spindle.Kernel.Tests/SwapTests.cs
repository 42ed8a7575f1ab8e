using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>
/// Swap on a device Spindle attached (direct mode: the kernel's own sockets, which it marks for memory reserves;
/// the attach daemon locks its memory). A program fills more memory than the guest has with known data, so most of
/// it goes out to the server and comes back, and checks every word.
/// </summary>
[Collection(KernelVmCollection.Name)]
public sealed class SwapTests(KernelVm vm)
{
    /// <remarks>
    /// A long request timeout (120 s): under TCG on a busy machine a swap-out can take longer than the 10 s default,
    /// the kernel then takes the connection for dead, and the daemon must reconnect while memory is short; the
    /// test is about swap, not about that.
    /// </remarks>
    [Fact]
    public async Task Swap_on_a_direct_device_holds_more_than_the_guest_memory_and_gives_it_back_intact()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("swap.img", 512 * MiB);
        await using var server = new HostServer(PeerServer.FreePort(), ["--name", "swap", image]);
        await server.StartAsync();
        var report = await vm.RunAsync($$"""
            export PATH=/usr/local/bin:$PATH
            step attach spindle attach --device nbd --io-timeout 120 --name swap nbd://{{KernelVm.HostAddress}}:{{server.Port}}/swap
            pid=$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' /run/spindle/swap.json)
            report daemon_locked_kb "$(awk '/VmLck/ { print $2 }' /proc/$pid/status)"
            report daemon_rss_kb "$(awk '/VmRSS/ { print $2 }' /proc/$pid/status)"
            report daemon_oom_adj "$(cat /proc/$pid/oom_score_adj)"
            # Swapping over a network needs memory to receive the server's replies while memory is short: a larger
            # free reserve keeps the network card's receive buffers refilled (the usual advice for swap over NBD/iSCSI).
            echo 16384 >/proc/sys/vm/min_free_kbytes
            step mkswap mkswap /dev/nbd0
            step swapon swapon /dev/nbd0
            total=$(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo)
            report mem_total_mib $total
            report swap_total_kb "$(awk '/SwapTotal/ { print $2 }' /proc/meminfo)"
            fill=$((total + 128))
            report fill_mib $fill
            step memfill memfill $fill 42
            report pswpout "$(awk '/^pswpout/ { print $2 }' /proc/vmstat)"
            report pswpin "$(awk '/^pswpin/ { print $2 }' /proc/vmstat)"
            report daemon_alive "$(kill -0 $pid && echo yes)"
            report daemon_rss_after_kb "$(awk '/VmRSS/ { print $2 }' /proc/$pid/status)"
            step swapoff swapoff /dev/nbd0
            step detach spindle detach swap
            """, memory: "384M", extraInitrds: [await vm.SpindleInitrdAsync()], limit: TimeSpan.FromMinutes(8));
        report.AssertCompleted();
        report.AssertSucceeded("attach", "mkswap", "swapon", "memfill", "swapoff", "detach");
        Assert.Contains("0 mismatched words", report.StepOutput("memfill"), StringComparison.Ordinal);
        Assert.True(report.ResultInt64("fill_mib") > report.ResultInt64("mem_total_mib"));
        Assert.True(report.ResultInt64("daemon_locked_kb") > 0, "the attach daemon did not lock its memory");
        Assert.Equal(-1000, report.ResultInt64("daemon_oom_adj"));
        Assert.Equal("yes", report.Result("daemon_alive"));

        // Pages (4 KiB each) went out to the device and came back in: more than the fill could keep in memory.
        var pagesOut = report.ResultInt64("pswpout");
        Assert.True(pagesOut * 4 / 1024 > report.ResultInt64("fill_mib") - report.ResultInt64("mem_total_mib"), $"only {pagesOut} pages were swapped out");
        Assert.True(report.ResultInt64("pswpin") > 0);
        TestContext.Current.TestOutputHelper?.WriteLine(
            $"swap: {report.Result("fill_mib")} MiB filled and checked in a {report.Result("mem_total_mib")} MiB guest; {pagesOut * 4 / 1024} MiB swapped out, " +
            $"{report.ResultInt64("pswpin") * 4 / 1024} MiB in; daemon {report.Result("daemon_rss_kb")} KiB resident, {report.Result("daemon_locked_kb")} KiB locked; {report.StepOutput("memfill").Trim()}; VM {report.Elapsed.TotalSeconds:F0} s");
    }
}
