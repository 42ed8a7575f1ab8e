using Spindle.Storage;
using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>
/// The Linux kernel's NBD client (nbd.ko, attached by nbd-client over netlink) reading and writing a Spindle file
/// export through /dev/nbd0, checked in the guest and again on the server's backing file.
/// </summary>
[Collection(KernelVmCollection.Name)]
public sealed class BlockIoTests(KernelVm vm)
{
    private const long Size = 64 * MiB;

    [Fact]
    public async Task Kernel_client_sees_the_size_and_round_trips_data_with_flush_and_fua()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", Size);
        var pattern = Patterns.Generate(8 * MiB, (int)(4 * MiB));
        var fuaData = Patterns.Generate(40 * MiB, 64 * 1024, seed: 2);
        var device = new RecordingBlockDevice(FileBlockDevice.Open(image, readOnly: false));
        VmReport report;
        IReadOnlyCollection<string> logs;
        await using (var server = await TestServer.StartAsync(device, "disk"))
        {
            // 48 MiB of zeroes out and back for a throughput figure; the pattern written with conv=fsync (WRITEs, then
            // FLUSH); 64 KiB with O_DIRECT|O_DSYNC (FUA writes); then the whole disk read back in 32 MiB requests, the
            // kernel's max_hw_sectors and the largest payload the spec says a server must accept.
            report = await vm.RunAsync($$"""
                step connect nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd0 -N disk
                report size "$(cat /sys/block/nbd0/size)"
                report ro "$(cat /sys/block/nbd0/ro)"
                report write_cache "$(cat /sys/block/nbd0/queue/write_cache)"
                report fua "$(cat /sys/block/nbd0/queue/fua)"
                dd_rate write_rate if=/dev/zero of=/dev/nbd0 bs=1M count=48 oflag=direct
                dd_rate read_rate if=/dev/nbd0 of=/dev/null bs=1M count=48 iflag=direct
                step pattern dd if=/scenario/pattern.bin of=/dev/nbd0 bs=1M seek=8 oflag=direct conv=fsync
                step fua dd if=/scenario/fua.bin of=/dev/nbd0 bs=4k seek=10240 oflag=direct,dsync
                step max_request sh -c 'cat /sys/block/nbd0/queue/max_hw_sectors_kb > /sys/block/nbd0/queue/max_sectors_kb'
                report_sha pattern_sha /dev/nbd0 bs=1M skip=8 count=4 iflag=direct
                report_sha device_sha /dev/nbd0 bs=32M iflag=direct
                step disconnect nbd-client -d /dev/nbd0
                wait_until 10 grep -qx 0 /sys/block/nbd0/size
                report size_after "$(cat /sys/block/nbd0/size)"
                """,
                new Dictionary<string, byte[]> { ["pattern.bin"] = pattern, ["fua.bin"] = fuaData });
            logs = await server.WaitForDisconnectsAsync(expected: 1);
        }

        report.AssertCompleted();
        report.AssertSucceeded("connect", "write_rate", "read_rate", "pattern", "fua", "max_request", "disconnect");

        // What the kernel made of the export: size in 512-byte sectors, writable, a write-back cache with FUA.
        Assert.Equal(Size / 512, report.ResultInt64("size"));
        Assert.Equal("0", report.Result("ro"));
        Assert.Equal("write back", report.Result("write_cache"));
        Assert.Equal("1", report.Result("fua"));
        Assert.Equal(0, report.ResultInt64("size_after"));

        // The guest read back what it wrote, and the file on the host holds the same bytes.
        Assert.Equal(Sha256(pattern), report.Result("pattern_sha"));
        Assert.Equal(await Sha256Async(image), report.Result("device_sha"));
        Assert.Equal(pattern, await ReadAsync(image, 8 * MiB, pattern.Length));
        Assert.Equal(fuaData, await ReadAsync(image, 40 * MiB, fuaData.Length));

        // The server saw a FLUSH after the pattern's last write, FUA writes for O_DSYNC, and 32 MiB reads.
        var operations = device.Operations.ToList();
        var lastPatternWrite = operations.FindLastIndex(o => o.Kind == OperationKind.Write && o.Offset < 12 * MiB && o.End > 8 * MiB);
        Assert.True(lastPatternWrite >= 0 && operations.Skip(lastPatternWrite).Any(o => o.Kind == OperationKind.Flush),
            "no FLUSH after the writes of conv=fsync");
        Assert.True(device.Covers(OperationKind.Write, 40 * MiB, 40 * MiB + fuaData.Length, o => o.Fua), "the O_DSYNC writes did not arrive with FUA");
        Assert.Contains(operations, o => o.Kind == OperationKind.Read && o.Length == 32 * MiB);

        // The kernel negotiates no structured replies and ends with NBD_CMD_DISC.
        Assert.Contains(logs, l => l.Contains("export disk", StringComparison.Ordinal) && l.Contains("structured replies False", StringComparison.Ordinal));
        ServerLogs.AssertNoErrorReplies(logs);
    }
}
