using Spindle.Storage;
using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>A file system the guest kernel makes, fills and checks on /dev/nbd0, checked again on the host.</summary>
[Collection(KernelVmCollection.Name)]
public sealed class Ext4Tests(KernelVm vm)
{
    private const long Size = 128 * MiB;

    [Fact]
    public async Task Ext4_made_and_filled_by_the_kernel_is_clean_on_the_host()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("fs.img", Size);
        var pattern = Patterns.Generate(0, (int)(3 * MiB), seed: 3);
        var device = new RecordingBlockDevice(FileBlockDevice.Open(image, readOnly: false));
        VmReport report;
        await using (var server = await TestServer.StartAsync(device, "fs"))
        {
            // 4 KiB blocks, as a file system wants them (nbd-client's default is 512).
            var connect = $"nbd-client {KernelVm.HostAddress} {server.Port} /dev/nbd0 -N fs -b 4096";

            // The second mount comes after a reconnect, so what it reads comes from the server, not the page cache.
            report = await vm.RunAsync($$"""
                step modules sh -c 'modprobe crc32c_generic && modprobe ext4'
                step connect {{connect}}
                report block_size "$(cat /sys/block/nbd0/queue/logical_block_size)"
                step mkfs mkfs.ext4 -q -F -L spindle /dev/nbd0
                step mount mount -t ext4 /dev/nbd0 /mnt
                step write sh -c 'mkdir -p /mnt/data/deep && cp /scenario/pattern.bin /mnt/data/pattern.bin && for i in $(seq 1 100); do echo "file $i" > /mnt/data/deep/f$i; done'
                step sync sync
                step fstrim fstrim -v /mnt
                step umount umount /mnt
                step fsck fsck.ext4 -f -n /dev/nbd0
                step disconnect nbd-client -d /dev/nbd0
                wait_until 10 grep -qx 0 /sys/block/nbd0/size
                step reconnect {{connect}}
                step mount_ro mount -t ext4 -o ro /dev/nbd0 /mnt
                report files "$(find /mnt/data -type f | wc -l)"
                report_sha pattern_sha /mnt/data/pattern.bin
                report f42 "$(cat /mnt/data/deep/f42)"
                step umount_ro umount /mnt
                step disconnect_again nbd-client -d /dev/nbd0
                """,
                new Dictionary<string, byte[]> { ["pattern.bin"] = pattern });
            await server.WaitForDisconnectsAsync(expected: 2);
        }

        report.AssertCompleted();
        report.AssertSucceeded("modules", "connect", "mkfs", "mount", "write", "sync", "fstrim", "umount", "fsck", "disconnect",
            "reconnect", "mount_ro", "umount_ro", "disconnect_again");
        Assert.Equal(4096, report.ResultInt64("block_size"));
        Assert.Equal(101, report.ResultInt64("files"));
        Assert.Equal(Sha256(pattern), report.Result("pattern_sha"));
        Assert.Equal("file 42", report.Result("f42"));

        // The image is a clean ext4 file system to the host's e2fsprogs too, holding the same files.
        var fsck = await PeerTool.RunAsync("e2fsck", ["-f", "-n", image]);
        Assert.True(fsck.ExitCode == 0, $"e2fsck on the host: {fsck}");
        var dumped = directory.File("pattern.out");
        await PeerTool.RunCheckedAsync("debugfs", ["-R", $"dump /data/pattern.bin {dumped}", image]);
        Assert.Equal(pattern, await File.ReadAllBytesAsync(dumped));
        var cat = await PeerTool.RunCheckedAsync("debugfs", ["-R", "cat /data/deep/f42", image]);
        Assert.Equal("file 42", cat.StandardOutput.Trim());

        // ext4 and sync(2) flush the write cache and write the journal commit with FUA; mkfs and fstrim discard.
        Assert.NotEmpty(device.OfKind(OperationKind.Flush));
        Assert.Contains(device.Operations, o => o.Kind == OperationKind.Write && o.Fua);
        Assert.NotEmpty(device.OfKind(OperationKind.Trim));
    }
}
