using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using Spindle.Fuse.Devices;
using Spindle.Fuse.Tests.Support;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>
/// <c>spindle attach</c> and <c>spindle detach</c> end to end, with the real tools on top: a loop device, ext4
/// (mkfs, mount, fstrim, fsck), and everything cleaned up afterwards, including after a crash.
/// </summary>
public sealed class AttachTests
{
    private const string RunDirectory = "/run/spindle";

    [Fact]
    public async Task Attach_mkfs_mount_write_fsck_detach_end_to_end()
    {
        using var scratch = new TempDirectory();
        var image = scratch.File("disk.img");
        var name = NewName();
        var filesystem = Directory.CreateDirectory(scratch.File("fs")).FullName;
        try
        {
            var loop = await AttachAsync("--create", "256M", "--name", name, image);
            var info = LoopDevice.Query(loop);
            Assert.NotNull(info);
            Assert.Equal($"{RunDirectory}/mnt/{name}/disk", info.BackingFile);
            Assert.True(info.DirectIo, "the loop device should submit direct I/O to the file");
            var state = ReadState(name);
            Assert.Equal("ready", state.GetProperty("phase").GetString());
            Assert.True(DaemonProcess.IsAlive(state.GetProperty("pid").GetInt32()));

            await PeerTool.RunCheckedAsync("mkfs.ext4", ["-q", "-F", loop], TimeSpan.FromSeconds(180));
            await PeerTool.RunCheckedAsync("mount", [loop, filesystem]);
            var checksums = WriteFiles(filesystem);
            await PeerTool.RunCheckedAsync("sync", []);

            // Discard reaches the image: a deleted file's blocks are punched out of disk.img.
            var scratchFile = Path.Combine(filesystem, "scratch.bin");
            File.WriteAllBytes(scratchFile, Patterns.Random(32 << 20, seed: 77));
            await PeerTool.RunCheckedAsync("sync", []);
            var allocatedBefore = await AllocatedBytesAsync(image);
            File.Delete(scratchFile);
            await PeerTool.RunCheckedAsync("sync", []);
            await PeerTool.RunCheckedAsync("fstrim", [filesystem]);
            Assert.True(await AllocatedBytesAsync(image) <= allocatedBefore - (16 << 20), "fstrim did not deallocate the deleted file's blocks");

            await PeerTool.RunCheckedAsync("umount", [filesystem]);
            await PeerTool.RunCheckedAsync("fsck.ext4", ["-n", "-f", loop], TimeSpan.FromSeconds(180));

            await PeerTool.RunCheckedAsync("mount", ["-o", "ro", loop, filesystem]);
            VerifyFiles(filesystem, checksums);
            await PeerTool.RunCheckedAsync("umount", [filesystem]);

            var detach = await SpindleCli.RunAsync("detach", name);
            Assert.True(detach.ExitCode == 0, detach.ToString());
            AssertCleanedUp(name, loop, state.GetProperty("pid").GetInt32());

            // Everything was flushed into the image itself: check it without Spindle.
            await PeerTool.RunCheckedAsync("fsck.ext4", ["-n", "-f", image], TimeSpan.FromSeconds(180));
            foreach (var (file, hash) in checksums)
            {
                var dumped = scratch.File("dumped-" + file);
                await PeerTool.RunCheckedAsync("debugfs", ["-R", $"dump /{file} {dumped}", image]);
                Assert.Equal(hash, Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(dumped))));
            }
        }
        finally
        {
            SpindleCli.EnsureUnmounted(filesystem);
            await ForceCleanupAsync(name);
        }
    }

    [Fact]
    public async Task Detach_refuses_while_a_file_system_is_mounted_and_succeeds_after()
    {
        using var scratch = new TempDirectory();
        var name = NewName();
        var filesystem = Directory.CreateDirectory(scratch.File("fs")).FullName;
        try
        {
            var loop = await AttachAsync("--name", name, "memory:64M");
            await PeerTool.RunCheckedAsync("mkfs.ext4", ["-q", "-F", loop], TimeSpan.FromSeconds(180));
            await PeerTool.RunCheckedAsync("mount", [loop, filesystem]);
            await File.WriteAllTextAsync(Path.Combine(filesystem, "note"), "still here", TestContext.Current.CancellationToken);

            var refused = await SpindleCli.RunAsync("detach", loop);
            Assert.Equal(1, refused.ExitCode);
            Assert.Contains("in use", refused.StandardError, StringComparison.Ordinal);
            Assert.Equal("still here", await File.ReadAllTextAsync(Path.Combine(filesystem, "note"), TestContext.Current.CancellationToken));

            await PeerTool.RunCheckedAsync("umount", [filesystem]);
            var pid = ReadState(name).GetProperty("pid").GetInt32();
            var detach = await SpindleCli.RunAsync("detach", loop);
            Assert.True(detach.ExitCode == 0, detach.ToString());
            AssertCleanedUp(name, loop, pid);
        }
        finally
        {
            SpindleCli.EnsureUnmounted(filesystem);
            await ForceCleanupAsync(name);
        }
    }

    [Fact]
    public async Task After_the_server_is_killed_detach_and_a_new_attach_clean_up()
    {
        var name = NewName();
        try
        {
            var loop = await AttachAsync("--name", name, "memory:32M");
            Assert.Equal($"{RunDirectory}/mnt/{name}/disk", LoopDevice.Query(loop)?.BackingFile);
            var pid = ReadState(name).GetProperty("pid").GetInt32();

            var duplicate = await SpindleCli.RunAsync("attach", "--name", name, "memory:32M");
            Assert.Equal(1, duplicate.ExitCode);
            Assert.Contains("already attached", duplicate.StandardError, StringComparison.Ordinal);

            Assert.True(DaemonProcess.Signal(pid, DaemonProcess.SigKill));
            await WaitUntilAsync(() => !DaemonProcess.IsAlive(pid));

            // Its last threads may still be going away (the leader is reported dead first); then the mount is stale.
            await WaitUntilAsync(() => MountTable.IsStale($"{RunDirectory}/mnt/{name}"));

            // Attaching the same name again removes the wreckage first.
            var again = await AttachAsync("--name", name, "memory:32M");
            var newPid = ReadState(name).GetProperty("pid").GetInt32();
            Assert.NotEqual(pid, newPid);
            Assert.Equal([again], LoopDevice.List().Where(device => device.BackingFile == $"{RunDirectory}/mnt/{name}/disk").Select(device => device.Device));

            // And detach cleans up after a killed server too.
            Assert.True(DaemonProcess.Signal(newPid, DaemonProcess.SigKill));
            await WaitUntilAsync(() => !DaemonProcess.IsAlive(newPid));
            var detach = await SpindleCli.RunAsync("detach", name);
            Assert.True(detach.ExitCode == 0, detach.ToString());
            AssertCleanedUp(name, again, newPid);
        }
        finally
        {
            await ForceCleanupAsync(name);
        }
    }

    [Fact]
    public async Task A_read_only_attach_gives_a_read_only_loop_device()
    {
        var name = NewName();
        try
        {
            var loop = await AttachAsync("--read-only", "--name", name, "memory:16M");
            var readOnly = await PeerTool.RunCheckedAsync("blockdev", ["--getro", loop]);
            Assert.Equal("1", readOnly.StandardOutput.Trim());
            var write = await PeerTool.RunAsync("dd", ["if=/dev/zero", $"of={loop}", "bs=4096", "count=1", "oflag=direct"]);
            Assert.NotEqual(0, write.ExitCode);
            await PeerTool.RunCheckedAsync("dd", [$"if={loop}", "of=/dev/null", "bs=1M", "count=4", "iflag=direct"]);

            var detach = await SpindleCli.RunAsync("detach", name);
            Assert.True(detach.ExitCode == 0, detach.ToString());
        }
        finally
        {
            await ForceCleanupAsync(name);
        }
    }

    [Fact]
    public async Task SIGTERM_to_the_server_releases_an_unused_loop_device_and_cleans_up()
    {
        var name = NewName();
        try
        {
            var loop = await AttachAsync("--name", name, "memory:16M");
            var pid = ReadState(name).GetProperty("pid").GetInt32();
            Assert.True(DaemonProcess.Signal(pid, DaemonProcess.SigTerm));
            await WaitUntilAsync(() => !DaemonProcess.IsAlive(pid));
            Assert.False(File.Exists($"{RunDirectory}/{name}.json"));
            Assert.False(Directory.Exists($"{RunDirectory}/mnt/{name}"));
            Assert.NotEqual($"{RunDirectory}/mnt/{name}/disk", LoopDevice.Query(loop)?.BackingFile);
        }
        finally
        {
            await ForceCleanupAsync(name);
        }
    }

    [Fact]
    public async Task Detach_of_something_not_attached_fails_clearly()
    {
        var result = await SpindleCli.RunAsync("detach", NewName());
        Assert.Equal(1, result.ExitCode);
        Assert.Contains("nothing named", result.StandardError, StringComparison.Ordinal);

        var invalid = await SpindleCli.RunAsync("attach", "--name", "../escape", "memory:1M");
        Assert.Equal(2, invalid.ExitCode);
    }

    private static string NewName() => "t-" + Guid.NewGuid().ToString("N")[..10];

    private static async Task<string> AttachAsync(params string[] arguments)
    {
        var result = await SpindleCli.RunAsync(["attach", .. arguments]);
        Assert.True(result.ExitCode == 0, $"spindle attach failed: {result}");
        var device = result.StandardOutput.Trim();
        Assert.StartsWith("/dev/loop", device, StringComparison.Ordinal);
        return device;
    }

    private static JsonElement ReadState(string name) =>
        JsonDocument.Parse(File.ReadAllText($"{RunDirectory}/{name}.json")).RootElement.Clone();

    private static void AssertCleanedUp(string name, string loop, int pid)
    {
        var mountPoint = $"{RunDirectory}/mnt/{name}";
        Assert.False(File.Exists($"{RunDirectory}/{name}.json"), "the state file is left");
        Assert.False(File.Exists($"{RunDirectory}/{name}.log"), "the log is left");
        Assert.False(Directory.Exists(mountPoint), "the mount directory is left");
        Assert.Null(MountTable.Find(mountPoint));
        Assert.False(DaemonProcess.IsAlive(pid), "the server still runs");
        Assert.DoesNotContain(LoopDevice.List(), device => device.BackingFile.StartsWith(mountPoint + "/", StringComparison.Ordinal));
        Assert.NotEqual($"{mountPoint}/disk", LoopDevice.Query(loop)?.BackingFile);
    }

    private static Dictionary<string, string> WriteFiles(string directory)
    {
        var checksums = new Dictionary<string, string>();
        int[] sizes = [1, 511, 4096, 65_537, 1 << 20, (3 << 20) + 17, 8 << 20];
        for (var i = 0; i < sizes.Length; i++)
        {
            var file = $"f{i}.bin";
            var data = Patterns.Random(sizes[i], seed: 100 + i);
            File.WriteAllBytes(Path.Combine(directory, file), data);
            checksums[file] = Convert.ToHexString(SHA256.HashData(data));
        }

        return checksums;
    }

    private static void VerifyFiles(string directory, Dictionary<string, string> checksums)
    {
        foreach (var (file, hash) in checksums)
        {
            Assert.Equal(hash, Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(Path.Combine(directory, file)))));
        }
    }

    private static async Task<long> AllocatedBytesAsync(string path)
    {
        var result = await PeerTool.RunCheckedAsync("stat", ["-c", "%b", path]);
        return long.Parse(result.StandardOutput.Trim(), CultureInfo.InvariantCulture) * 512;
    }

    private static async Task WaitUntilAsync(Func<bool> condition)
    {
        var watch = System.Diagnostics.Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(watch.Elapsed < TimeSpan.FromSeconds(60), "the condition was not reached in time");
            await Task.Delay(20, TestContext.Current.CancellationToken);
        }
    }

    /// <summary>Whatever state a failed test left: detach, and failing that remove every piece by hand.</summary>
    private static async Task ForceCleanupAsync(string name)
    {
        var mountPoint = $"{RunDirectory}/mnt/{name}";
        if (!File.Exists($"{RunDirectory}/{name}.json") && !Directory.Exists(mountPoint))
        {
            // A server stopped by a signal keeps its log for diagnosis; tests leave nothing.
            File.Delete($"{RunDirectory}/{name}.log");
            return;
        }

        var detach = await SpindleCli.RunAsync("detach", name);
        if (detach.ExitCode == 0)
        {
            return;
        }

        foreach (var device in LoopDevice.List().Where(d => d.BackingFile.StartsWith(mountPoint + "/", StringComparison.Ordinal)))
        {
            await PeerTool.RunAsync("losetup", ["-d", device.Device]);
        }

        if (File.Exists($"{RunDirectory}/{name}.json") && ReadState(name).TryGetProperty("pid", out var pid) &&
            DaemonProcess.CommandLine(pid.GetInt32()).Contains("--serve-daemon"))
        {
            DaemonProcess.Signal(pid.GetInt32(), DaemonProcess.SigKill);
        }

        SpindleCli.EnsureUnmounted(mountPoint);
        try
        {
            Directory.Delete(mountPoint);
        }
        catch (IOException)
        {
        }

        File.Delete($"{RunDirectory}/{name}.json");
        File.Delete($"{RunDirectory}/{name}.log");
    }
}
