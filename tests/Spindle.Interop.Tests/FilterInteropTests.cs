using System.Diagnostics;
using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// The fault and rate filters (issue 14) driven by libnbd and nbdcopy: injected errors are the chosen errno
/// on the chosen commands only, at about the chosen rate; the rate limit is never beaten; the request log and the
/// delays show in what the log records.
/// </summary>
public sealed class FilterInteropTests
{
    private const int Mi = 1024 * 1024;

    [Fact]
    public async Task Injected_errors_are_the_chosen_errno_on_the_chosen_commands_at_about_the_chosen_rate()
    {
        await using var spindle = await SpindleProcess.StartAsync("serve", "--memory", "16M", "--error-rate", "30%", "--error-errno", "ENOSPC", "--error-commands", "write,zero", "--error-seed", "42", "--bind", "127.0.0.1", "--port", "0", "--print-uri");

        // 400 writes of distinct data: each either succeeds and reads back, or fails with ENOSPC and changed nothing.
        // Reads, trims and flushes never fail. The connection stays in step throughout.
        var script = """
            import errno, sys, nbd
            h = nbd.NBD(); h.connect_uri(sys.argv[1])
            n, failed = 400, 0
            for i in range(n):
                data = bytes([i % 251 + 1]) * 4096
                try:
                    h.pwrite(data, i * 4096)
                    assert h.pread(4096, i * 4096) == data
                except nbd.Error as e:
                    assert e.errnum == errno.ENOSPC, f"write {i}: {e.string}"
                    failed += 1
                    assert h.pread(4096, i * 4096) == bytes(4096), "a failed write changed the disk"
            zeroes = 0
            for i in range(100):
                try:
                    h.zero(4096, i * 4096)
                except nbd.Error as e:
                    assert e.errnum == errno.ENOSPC
                    zeroes += 1
            for i in range(200):
                h.pread(4096, i * 4096); h.trim(4096, 8 * 1024 * 1024 + i * 4096); h.flush()
            h.shutdown()
            print(failed, zeroes)
            """;
        var result = await PeerTool.RunPythonAsync(script, [spindle.Uri!]);
        Assert.True(result.ExitCode == 0, result.ToString());
        var counts = result.StandardOutput.Trim().Split(' ').Select(t => int.Parse(t, CultureInfo.InvariantCulture)).ToArray();

        // p = 0.3: 120 of 400 expected (standard deviation 9), 30 of 100; the bands are many deviations wide.
        Assert.InRange(counts[0], 60, 180);
        Assert.InRange(counts[1], 10, 55);
        Assert.Equal(0, await spindle.StopAsync());
    }

    [Fact]
    public async Task The_rate_limit_plus_its_burst_is_never_exceeded()
    {
        const long rate = 4 * Mi;
        const long burst = Mi;
        await using var spindle = await SpindleProcess.StartAsync("serve", "--memory", "8M", "--rate", "4M", "--rate-burst", "1M", "--bind", "127.0.0.1", "--port", "0", "--print-uri");
        using var directory = new TempDirectory();
        var source = directory.File("source.img");
        await File.WriteAllBytesAsync(source, Patterns.Random(8 * Mi, seed: 2)); // no zero blocks nbdcopy could skip

        // Bytes moved within the measured time can be at most burst + rate × time; that bounds the time from below
        // only (a slow machine is never a failure). Measured wall time includes nbdcopy's start, so it is generous.
        var clock = Stopwatch.StartNew();
        await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", source, spindle.Uri!]);
        var elapsed = clock.Elapsed.TotalSeconds;
        Assert.True(8 * Mi <= burst + (rate * elapsed), $"8 MiB written in {elapsed:F2} s beats {rate} bytes/s with a {burst}-byte burst");

        clock.Restart();
        var copy = directory.File("copy.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [spindle.Uri!, copy]);
        elapsed = clock.Elapsed.TotalSeconds;
        Assert.True(8 * Mi <= burst + (rate * elapsed), $"8 MiB read in {elapsed:F2} s beats the limit");
        Assert.Equal(await File.ReadAllBytesAsync(source), await File.ReadAllBytesAsync(copy));
        Assert.Equal(0, await spindle.StopAsync());
    }

    [Fact]
    public async Task The_request_log_has_a_line_per_request_with_delays_and_injected_errors()
    {
        using var directory = new TempDirectory();
        var log = directory.File("requests.log");
        await using var spindle = await SpindleProcess.StartAsync("serve", "--memory", "16M", "--delay-read", "20", "--error-rate", "1", "--error-commands", "flush", "--error-errno", "EIO", "--log-requests", log, "--bind", "127.0.0.1", "--port", "0", "--print-uri");
        var script = """
            import sys, nbd
            h = nbd.NBD(); h.connect_uri(sys.argv[1])
            h.pwrite(b"\x11" * 65536, 0)
            assert h.pread(65536, 0) == b"\x11" * 65536
            h.trim(65536, 1 << 20)
            try:
                h.flush()
            except nbd.Error as e:
                print(e.errnum)
            h.shutdown()
            """;
        var result = await PeerTool.RunPythonAsync(script, [spindle.Uri!]);
        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal("5", result.StandardOutput.Trim()); // EIO, injected on every FLUSH and nothing else
        Assert.Equal(0, await spindle.StopAsync());

        var lines = await File.ReadAllLinesAsync(log);
        Assert.Contains(lines, l => l.Contains("conn=1 WRITE offset=0 length=65536 result=OK", StringComparison.Ordinal));
        Assert.Contains(lines, l => l.Contains("conn=1 TRIM offset=1048576 length=65536 result=OK", StringComparison.Ordinal));
        Assert.Contains(lines, l => l.Contains("conn=1 FLUSH offset=0 length=0 result=EIO", StringComparison.Ordinal));
        var reads = lines.Where(l => l.Contains(" READ offset=0 length=65536 result=OK", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(reads);

        // The read delay shows in the latency. A lower bound only (a slow machine never fails it), and half the delay,
        // since the runtime's timers may fire a little early.
        Assert.All(reads, l => Assert.True(long.Parse(l[(l.LastIndexOf('=') + 1)..], CultureInfo.InvariantCulture) >= 10_000, l));
        Assert.All(lines, l => Assert.Matches(@"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z conn=\d+ [A-Z_+]+ offset=\d+ length=\d+ result=[A-Z]+ latency_us=\d+$", l));
    }
}
