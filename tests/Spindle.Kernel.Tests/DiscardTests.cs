using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>Discard and zeroing from the kernel: what reaches the server, and the holes they leave in its file.</summary>
[Collection(KernelVmCollection.Name)]
public sealed class DiscardTests(KernelVm vm)
{
    private const long Size = 64 * MiB;
    private const long HugeSize = 16L * 1024 * MiB;

    [Fact]
    public async Task Discard_and_zeroing_reach_the_server_and_leave_holes()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", Size);
        var hugeImage = directory.CreateSparseFile("huge.img", HugeSize);
        var device = new RecordingBlockDevice(FileBlockDevice.Open(image, readOnly: false));
        var huge = new RecordingBlockDevice(FileBlockDevice.Open(hugeImage, readOnly: false));
        var pattern = Patterns.Generate(0, (int)(4 * MiB), seed: 4);
        VmReport report;
        IReadOnlyCollection<string> logs;
        await using (var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "disk" }, device));
            catalog.Add(new Export(new ExportOptions { Name = "huge" }, huge));
        }))
        {
            // 16 MiB of data, then one 4 MiB quarter each: discarded (TRIM), zeroed through BLKZEROOUT, zeroed with
            // fallocate's ZERO_RANGE (both may not unmap), punched with fallocate's PUNCH_HOLE (may unmap).
            // On a 16 GiB export: data at 0, 5 GiB and the last 4 MiB, then the whole device discarded at once,
            // which the kernel has to cut into requests whose 32-bit length fits.
            report = await vm.RunAsync($$"""
                step connect nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd0 -N disk
                report write_zeroes_max "$(cat /sys/block/nbd0/queue/write_zeroes_max_bytes)"
                report discard_max "$(cat /sys/block/nbd0/queue/discard_max_bytes)"
                step fill sh -c 'for i in 0 1 2 3; do /usr/bin/dd if=/scenario/pattern.bin of=/dev/nbd0 bs=1M seek=$((i * 4)) oflag=direct status=none || exit 1; done'
                step discard blkdiscard -o 0 -l 4194304 /dev/nbd0
                step zeroout blkdiscard -z -o 4194304 -l 4194304 /dev/nbd0
                step zero_range fallocate -z -o 8388608 -l 4194304 /dev/nbd0
                step punch fallocate -p -o 12582912 -l 4194304 /dev/nbd0
                report_sha zeroed_sha /dev/nbd0 bs=1M skip=4 count=8 iflag=direct
                report_sha punched_sha /dev/nbd0 bs=1M skip=12 count=4 iflag=direct
                step disconnect nbd-client -d /dev/nbd0
                step huge_connect nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd1 -N huge
                report huge_size "$(cat /sys/block/nbd1/size)"
                step huge_fill sh -c 'for mib in 0 5120 16380; do /usr/bin/dd if=/scenario/pattern.bin of=/dev/nbd1 bs=1M seek=$mib oflag=direct status=none || exit 1; done'
                step huge_discard blkdiscard /dev/nbd1
                step huge_disconnect nbd-client -d /dev/nbd1
                """,
                new Dictionary<string, byte[]> { ["pattern.bin"] = pattern });
            logs = await server.WaitForDisconnectsAsync(expected: 2);
        }

        report.AssertCompleted();
        report.AssertSucceeded("connect", "fill", "discard", "zeroout", "zero_range", "disconnect", "huge_connect", "huge_fill", "huge_discard", "huge_disconnect");
        Assert.Equal(HugeSize / 512, report.ResultInt64("huge_size"));
        Assert.True(report.ResultInt64("discard_max") > 0, "the kernel did not enable discard although Spindle advertises TRIM");
        var zeroes = new byte[4 * MiB];
        Assert.Equal(Sha256(new byte[8 * MiB]), report.Result("zeroed_sha"));

        // TRIM punched a hole in the file; the zeroed ranges read as zeroes on the host.
        Assert.True(device.Covers(OperationKind.Trim, 0, 4 * MiB), "blkdiscard did not arrive as TRIM");
        await AssertHoleAsync(image, 0, 4 * MiB);
        Assert.Equal(zeroes, await ReadAsync(image, 4 * MiB, zeroes.Length));
        Assert.Equal(zeroes, await ReadAsync(image, 8 * MiB, zeroes.Length));

        if (report.ResultInt64("write_zeroes_max") > 0)
        {
            // A kernel whose nbd driver sends NBD_CMD_WRITE_ZEROES: every zeroing arrives as one, and the punched
            // quarter reads as zeroes too.
            Assert.True(device.Covers(OperationKind.WriteZeroes, 4 * MiB, 16 * MiB), "zeroing did not arrive as WRITE_ZEROES");
            report.AssertSucceeded("punch");
            Assert.Equal(Sha256(zeroes), report.Result("punched_sha"));
            Assert.Equal(zeroes, await ReadAsync(image, 12 * MiB, zeroes.Length));
        }
        else
        {
            // Debian 12's kernel (6.1) has no WRITE_ZEROES in nbd.ko: it ignores SEND_WRITE_ZEROES, zeroes by writing
            // zero-filled pages, and refuses PUNCH_HOLE on the device (it may not fall back to writing).
            Assert.Empty(device.OfKind(OperationKind.WriteZeroes));
            Assert.True(device.Covers(OperationKind.Write, 4 * MiB, 12 * MiB), "the kernel's zeroing fallback did not write zeroes");
            Assert.NotEqual(0, report.StepExitCode("punch"));
            Assert.Equal(Sha256(pattern), report.Result("punched_sha"));
        }

        // The 16 GiB discard arrived as TRIMs that each fit NBD's 32-bit length and together cover the device. The
        // kernel cuts them at multiples of 4 GiB - 512, so a hole punched for each ends in a partial file-system block,
        // which the host file system zeroes instead of freeing: all the data is gone, a few blocks stay allocated.
        var trims = huge.OfKind(OperationKind.Trim).ToList();
        TestContext.Current.TestOutputHelper?.WriteLine($"TRIMs of the 16 GiB discard: {string.Join(", ", trims.Select(t => $"{t.Offset}+{t.Length}"))}");
        Assert.True(huge.Covers(OperationKind.Trim, 0, HugeSize), $"the TRIMs do not cover the 16 GiB export: {string.Join(", ", trims)}");
        Assert.All(trims, t => Assert.InRange(t.Length, 1, uint.MaxValue));
        var left = await DataExtentsAsync(hugeImage);
        Assert.True(left.Sum(e => e.End - e.Start) <= trims.Count * 2 * 4096, $"the discarded file still holds {string.Join(", ", left)}");
        foreach (var offset in new[] { 0, 5120 * MiB, HugeSize - pattern.Length })
        {
            Assert.Equal(zeroes, await ReadAsync(hugeImage, offset, pattern.Length));
        }
        ServerLogs.AssertNoErrorReplies(logs);
    }
}
