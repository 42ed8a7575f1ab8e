using Spindle.Storage;
using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>
/// A read-only export attached through the older ioctl interface (nbd-client -L), a read error from the backend,
/// and the disconnect.
/// </summary>
[Collection(KernelVmCollection.Name)]
public sealed class ReadOnlyTests(KernelVm vm)
{
    private const long Size = 16 * MiB;
    private const long BadSector = 12 * MiB;

    [Fact]
    public async Task Read_only_export_is_read_only_in_the_kernel_survives_a_read_error_and_disconnects_cleanly()
    {
        using var directory = new TempDirectory();
        var image = directory.File("ro.img");
        await File.WriteAllBytesAsync(image, Patterns.Generate(0, (int)Size, seed: 5));
        var before = await Sha256Async(image);
        var device = new RecordingBlockDevice(FileBlockDevice.Open(image, readOnly: true)) { FailingReads = (BadSector, 4096) };
        VmReport report;
        IReadOnlyCollection<string> logs;
        await using (var server = await TestServer.StartAsync(device, "ro", readOnly: true))
        {
            // The read of the bad sector fails with EIO; the same connection then serves the first 12 MiB again.
            report = await vm.RunAsync($$"""
                step connect nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd0 -N ro -L
                report ro "$(cat /sys/block/nbd0/ro)"
                report getro "$(blockdev --getro /dev/nbd0)"
                report_sha head_sha /dev/nbd0 bs=1M count=12 iflag=direct
                step write dd if=/dev/zero of=/dev/nbd0 bs=4k count=1 oflag=direct
                step bad_read dd if=/dev/nbd0 of=/dev/null bs=4k skip=3072 count=1 iflag=direct
                report_sha head_sha_again /dev/nbd0 bs=1M count=12 iflag=direct
                step disconnect nbd-client -d /dev/nbd0
                wait_until 10 grep -qx 0 /sys/block/nbd0/size
                report size_after "$(cat /sys/block/nbd0/size)"
                step check nbd-client -c /dev/nbd0
                """);
            logs = await server.WaitForDisconnectsAsync(expected: 1);
        }

        report.AssertCompleted();
        report.AssertSucceeded("connect", "disconnect");
        Assert.Equal("1", report.Result("ro"));
        Assert.Equal("1", report.Result("getro"));
        var head = Sha256(await ReadAsync(image, 0, (int)(12 * MiB)));
        Assert.Equal(head, report.Result("head_sha"));

        // The kernel refuses the write itself (EPERM): nothing reaches the server and the file is unchanged.
        Assert.NotEqual(0, report.StepExitCode("write"));
        Assert.Contains("Operation not permitted", report.StepOutput("write"), StringComparison.Ordinal);
        Assert.Empty(device.OfKind(OperationKind.Write));
        Assert.Equal(before, await Sha256Async(image));

        // Spindle's simple error reply fails that one read with EIO, and the connection goes on serving.
        Assert.NotEqual(0, report.StepExitCode("bad_read"));
        Assert.Contains("Input/output error", report.StepOutput("bad_read"), StringComparison.Ordinal);
        Assert.Contains(device.Operations, o => o.Kind == OperationKind.Read && o.Offset <= BadSector && o.End > BadSector);
        Assert.Contains(logs, l => l.Contains("failed with EIO", StringComparison.Ordinal));
        Assert.Equal(head, report.Result("head_sha_again"));

        // nbd-client -d: NBD_CMD_DISC reached the server (WaitForDisconnectsAsync), the device is gone.
        Assert.Equal(0, report.ResultInt64("size_after"));
        Assert.NotEqual(0, report.StepExitCode("check"));
        Assert.Contains(logs, l => l.Contains("export ro ", StringComparison.Ordinal) && l.Contains("ReadOnly", StringComparison.Ordinal));
    }
}
