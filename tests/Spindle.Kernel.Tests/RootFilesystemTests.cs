using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>
/// A guest whose root file system is a Spindle export: the initramfs runs <c>spindle attach</c>, mounts /dev/nbd0
/// and switches root to it; the real system's /sbin/init writes files with fsync, reads them back, and shuts down
/// cleanly (root remounted read-only, then power off). The host then finds a clean ext4 holding those files.
/// </summary>
[Collection(KernelVmCollection.Name)]
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed class RootFilesystemTests(KernelVm vm)
{
    /// <summary>The real system's init: a busybox shell script on the exported file system.</summary>
    private const string Init = """
        #!/bin/busybox sh
        /bin/busybox --install -s /bin
        export PATH=/bin
        say() { echo "@@spindle $*"; }
        say "result root=$(awk '$2 == "/" { print $1 " " $3 }' /proc/mounts)"
        say "result pid1=$(cat /proc/1/comm)"
        say "result daemon=$(for p in /proc/[0-9]*; do tr '\0' ' ' <$p/cmdline 2>/dev/null; echo; done | grep -c '^/usr/local/bin/spindle attach')"
        mkdir -p /data
        : >/files
        i=0
        while [ $i -lt 30 ]; do
          i=$((i + 1))
          head -c $((i * 7919)) /dev/urandom >/tmp/data
          dd if=/tmp/data of=/data/f$i bs=64k conv=fsync 2>/dev/null || say "result write_error=f$i"
          echo "f$i $(sha256sum </tmp/data | cut -d' ' -f1)" >>/files
        done
        sync
        echo 3 >/proc/sys/vm/drop_caches
        bad=0
        while read name sha; do
          [ "$(sha256sum </data/$name | cut -d' ' -f1)" = "$sha" ] || bad=$((bad + 1))
        done </files
        say "result mismatches=$bad"
        say "result filelist=$(tr '\n' ';' </files)"
        # A clean shutdown: nothing left dirty, the root read-only (ext4 marks itself clean), then power off.
        sync
        mount -o remount,ro /
        say "step remount_ro rc=$?"
        say "done"
        poweroff -f
        """;

    [Fact]
    public async Task Guest_boots_with_its_root_on_a_spindle_export_runs_a_workload_and_shuts_down_cleanly()
    {
        using var directory = new TempDirectory();
        var root = directory.File("root");
        foreach (var sub in new[] { "bin", "sbin", "dev", "proc", "sys", "run", "tmp", "mnt", "etc" })
        {
            Directory.CreateDirectory(Path.Combine(root, sub));
        }

        File.Copy(PeerTool.Require("busybox"), Path.Combine(root, "bin", "busybox"));
        File.CreateSymbolicLink(Path.Combine(root, "bin", "sh"), "busybox");
        var init = Path.Combine(root, "sbin", "init");
        await File.WriteAllTextAsync(init, Init.ReplaceLineEndings("\n") + "\n");
        File.SetUnixFileMode(init, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
        var image = directory.File("root.img");
        var mkfs = await PeerTool.RunAsync("mkfs.ext4", ["-q", "-F", "-b", "4096", "-L", "spindle-root", "-d", root, image, "96M"]);
        Assert.True(mkfs.ExitCode == 0, mkfs.ToString());

        await using var server = new HostServer(PeerServer.FreePort(), ["--name", "root", image]);
        await server.StartAsync();
        var report = await vm.RunAsync($$"""
            export PATH=/usr/local/bin:$PATH
            step modules sh -c 'modprobe crc32c_generic && modprobe ext4'
            step attach spindle attach --device nbd --name root nbd://{{KernelVm.HostAddress}}:{{server.Port}}/root
            mkdir -p /newroot
            step mount mount -t ext4 /dev/nbd0 /newroot
            for d in dev proc sys run; do mount --move /$d /newroot/$d; done
            exec switch_root /newroot /sbin/init
            """, extraInitrds: [await vm.SpindleInitrdAsync()], limit: TimeSpan.FromMinutes(5));
        await server.DisposeAsync();

        report.AssertCompleted();
        report.AssertSucceeded("modules", "attach", "mount", "remount_ro");
        Assert.Equal("/dev/nbd0 ext4", report.Result("root"));
        Assert.Equal("init", report.Result("pid1"));
        Assert.Equal(1, report.ResultInt64("daemon"));
        Assert.Equal(0, report.ResultInt64("mismatches"));
        Assert.DoesNotContain("write_error", report.Console, StringComparison.Ordinal);
        var written = report.Result("filelist").Split(';', StringSplitOptions.RemoveEmptyEntries).Select(line => line.Split(' ')).ToList();
        Assert.Equal(30, written.Count);

        // On the host: ext4 says it was unmounted cleanly, fsck agrees, and the files hold what the guest wrote.
        var header = await PeerTool.RunAsync("dumpe2fs", ["-h", image]);
        Assert.Matches(@"Filesystem state:\s+clean", header.StandardOutput);
        var fsck = await PeerTool.RunAsync("e2fsck", ["-f", "-n", image]);
        Assert.True(fsck.ExitCode == 0, fsck.ToString());
        var dumps = directory.File("dumps");
        Directory.CreateDirectory(dumps);
        var commands = directory.File("debugfs.cmd");
        await File.WriteAllLinesAsync(commands, written.Select(file => $"dump /data/{file[0]} {Path.Combine(dumps, file[0])}"));
        var debugfs = await PeerTool.RunAsync("debugfs", ["-f", commands, image]);
        Assert.True(debugfs.ExitCode == 0, debugfs.ToString());
        foreach (var file in written)
        {
            Assert.Equal(file[1], await Sha256Async(Path.Combine(dumps, file[0])));
        }

        TestContext.Current.TestOutputHelper?.WriteLine($"root on nbd0: {written.Count} files written, read back and found in the image; clean shutdown; VM {report.Elapsed.TotalSeconds:F0} s");
    }
}
