using Spindle.Fuse.Devices;
using Spindle.Fuse.Tests.Support;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary><c>spindle mount</c> as a user runs it: a separate process, stopped by signals, or killed.</summary>
public sealed class MountCommandTests
{
    [Fact]
    public async Task Mount_serves_the_file_until_SIGTERM_then_unmounts_and_flushes()
    {
        using var scratch = new TempDirectory();
        var image = scratch.CreateSparseFile("disk.img", 8 << 20);
        var directory = Directory.CreateDirectory(scratch.File("mnt")).FullName;
        try
        {
            var (process, line, output) = await SpindleCli.StartAsync("mount", image, directory);
            using (process)
            {
                Assert.Equal(Path.Combine(directory, "disk"), line);
                var data = Patterns.Generate(1 << 20, 65536, seed: 21);
                using (var file = PosixFile.Open(line, Posix.ORdWr))
                {
                    file.WriteExactly(data, 1 << 20);
                }

                Assert.Equal(0, await SpindleCli.StopAsync(process));
                Assert.Null(MountTable.Find(directory));
                Assert.Contains("unmounted", Snapshot(output), StringComparison.Ordinal);
                Assert.DoesNotContain("still in use", Snapshot(output), StringComparison.Ordinal);
                Assert.Equal(data, Backends.ReadBacking(FileBlockDeviceAt(image), 1 << 20, data.Length));
            }
        }
        finally
        {
            SpindleCli.EnsureUnmounted(directory);
        }
    }

    [Fact]
    public async Task Mount_of_a_qcow2_image_exposes_its_virtual_disk_and_qemu_reads_what_was_written()
    {
        using var scratch = new TempDirectory();
        var image = scratch.File("vm.qcow2");
        await PeerTool.RunCheckedAsync("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, "32M"]);
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x3c 0 1M", image]);
        var directory = Directory.CreateDirectory(scratch.File("mnt")).FullName;
        var data = Patterns.Generate(3 << 20, 65536, seed: 7);
        try
        {
            var (process, line, output) = await SpindleCli.StartAsync("mount", image, directory);
            using (process)
            {
                Assert.Equal(32 << 20, new FileInfo(line).Length);
                using (var file = PosixFile.Open(line, Posix.ORdWr))
                {
                    Assert.All(file.ReadExactly(0, 4096), b => Assert.Equal(0x3c, b));
                    file.WriteExactly(data, 3 << 20);
                }

                Assert.Equal(0, await SpindleCli.StopAsync(process));
                Assert.Null(MountTable.Find(directory));
            }

            // The image is still qcow2, consistent, and holds what went through the mount.
            var check = await PeerTool.RunAsync("qemu-img", ["check", image]);
            Assert.True(check.ExitCode == 0, check.ToString());
            var raw = scratch.File("vm.raw");
            await PeerTool.RunCheckedAsync("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, raw]);
            var bytes = await File.ReadAllBytesAsync(raw);
            Assert.Equal(data, bytes[(3 << 20)..((3 << 20) + data.Length)]);
            Assert.All(bytes[..(1 << 20)], b => Assert.Equal(0x3c, b));
        }
        finally
        {
            SpindleCli.EnsureUnmounted(directory);
        }
    }

    [Fact]
    public async Task SIGTERM_while_the_file_is_open_serves_it_until_closed()
    {
        using var scratch = new TempDirectory();
        var directory = Directory.CreateDirectory(scratch.File("mnt")).FullName;
        try
        {
            var (process, line, output) = await SpindleCli.StartAsync("mount", "memory:4M", directory);
            using (process)
            {
                using (var file = PosixFile.Open(line, Posix.ORdWr))
                {
                    PeerTool.Signal(process, DaemonProcess.SigTerm);
                    var watch = System.Diagnostics.Stopwatch.StartNew();
                    while (MountTable.Find(directory) is not null && watch.Elapsed < TimeSpan.FromSeconds(30))
                    {
                        await Task.Delay(20, TestContext.Current.CancellationToken);
                    }

                    // Detached from the directory, yet the open file still reads and writes, and the server waits.
                    Assert.Null(MountTable.Find(directory));
                    file.WriteExactly(Patterns.Generate(0, 4096), 0);
                    Assert.Equal(Patterns.Generate(0, 4096), file.ReadExactly(0, 4096));
                    Assert.False(process.HasExited);
                }

                using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                await process.WaitForExitAsync(wait.Token);
                Assert.Equal(0, process.ExitCode);
                Assert.Contains("still in use", Snapshot(output), StringComparison.Ordinal);
            }
        }
        finally
        {
            SpindleCli.EnsureUnmounted(directory);
        }
    }

    [Fact]
    public async Task A_killed_mount_leaves_a_stale_mount_that_the_next_mount_replaces_and_detach_removes()
    {
        using var scratch = new TempDirectory();
        var directory = Directory.CreateDirectory(scratch.File("mnt")).FullName;
        try
        {
            var (first, _, _) = await SpindleCli.StartAsync("mount", "memory:4M", directory);
            using (first)
            {
                first.Kill();
                await first.WaitForExitAsync(TestContext.Current.CancellationToken);
            }

            Assert.Equal(-Posix.ENOTCONN, Posix.Open(Path.Combine(directory, "disk"), Posix.ORdOnly));
            Assert.True(MountTable.IsStale(directory));

            var (second, line, output) = await SpindleCli.StartAsync("mount", "memory:8M", directory);
            using (second)
            {
                Assert.Equal(8 << 20, new FileInfo(line).Length);

                // The warning is on standard error, which may arrive after the path on standard output.
                var watch = System.Diagnostics.Stopwatch.StartNew();
                while (!Snapshot(output).Contains("stale", StringComparison.Ordinal) && watch.Elapsed < TimeSpan.FromSeconds(30))
                {
                    await Task.Delay(20, TestContext.Current.CancellationToken);
                }

                Assert.Contains("stale", Snapshot(output), StringComparison.Ordinal);
                second.Kill();
                await second.WaitForExitAsync(TestContext.Current.CancellationToken);
            }

            var detach = await SpindleCli.RunAsync("detach", directory);
            Assert.True(detach.ExitCode == 0, detach.ToString());
            Assert.Contains("stale", detach.StandardError, StringComparison.Ordinal);
            Assert.Null(MountTable.Find(directory));
            Assert.Equal(0, Posix.Probe(directory));
        }
        finally
        {
            SpindleCli.EnsureUnmounted(directory);
        }
    }

    [Fact]
    public async Task Detach_of_a_mount_directory_stops_that_mount()
    {
        using var scratch = new TempDirectory();
        var directory = Directory.CreateDirectory(scratch.File("mnt")).FullName;
        try
        {
            var (process, _, _) = await SpindleCli.StartAsync("mount", "memory:4M", directory);
            using (process)
            {
                var detach = await SpindleCli.RunAsync("detach", directory);
                Assert.True(detach.ExitCode == 0, detach.ToString());
                using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                await process.WaitForExitAsync(wait.Token);
                Assert.Equal(0, process.ExitCode);
                Assert.Null(MountTable.Find(directory));
            }
        }
        finally
        {
            SpindleCli.EnsureUnmounted(directory);
        }
    }

    [Fact]
    public async Task Mounting_on_a_missing_or_busy_directory_fails_with_a_message()
    {
        using var scratch = new TempDirectory();
        var missing = await SpindleCli.RunAsync("mount", "memory:1M", scratch.File("missing"));
        Assert.Equal(1, missing.ExitCode);
        Assert.Contains("does not exist", missing.StandardError, StringComparison.Ordinal);

        var directory = Directory.CreateDirectory(scratch.File("mnt")).FullName;
        try
        {
            var (process, _, _) = await SpindleCli.StartAsync("mount", "memory:1M", directory);
            using (process)
            {
                var busy = await SpindleCli.RunAsync("mount", "memory:1M", directory);
                Assert.Equal(1, busy.ExitCode);
                Assert.Contains("already a mount point", busy.StandardError, StringComparison.Ordinal);
                Assert.Equal(0, await SpindleCli.StopAsync(process));
            }
        }
        finally
        {
            SpindleCli.EnsureUnmounted(directory);
        }
    }

    [Fact]
    public async Task Read_only_mounts_refuse_writes()
    {
        using var scratch = new TempDirectory();
        var image = scratch.CreateSparseFile("disk.img", 1 << 20);
        var directory = Directory.CreateDirectory(scratch.File("mnt")).FullName;
        try
        {
            var (process, line, _) = await SpindleCli.StartAsync("mount", "--read-only", image, directory);
            using (process)
            {
                Assert.Equal(-Posix.EROFS, Posix.Open(line, Posix.ORdWr));
                using (var file = PosixFile.Open(line, Posix.ORdOnly))
                {
                    Assert.Equal(new byte[512], file.ReadExactly(0, 512));
                }

                Assert.Equal(0, await SpindleCli.StopAsync(process));
            }
        }
        finally
        {
            SpindleCli.EnsureUnmounted(directory);
        }
    }

    [Fact]
    public async Task Nbd_uri_of_a_server_that_is_not_there_fails_clearly_without_mounting()
    {
        using var scratch = new TempDirectory();

        // A port nothing listens on: bound, then released.
        int port;
        using (var probe = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0))
        {
            probe.Start();
            port = ((System.Net.IPEndPoint)probe.LocalEndpoint).Port;
        }

        var result = await SpindleCli.RunAsync("mount", $"nbd://127.0.0.1:{port}/export", scratch.Path);
        Assert.Equal(1, result.ExitCode);
        Assert.Contains($"cannot connect to 127.0.0.1:{port}", result.StandardError, StringComparison.Ordinal);
        Assert.Null(MountTable.Find(scratch.Path));

        var help = await SpindleCli.RunAsync("mount", "--help");
        Assert.Contains("--dead-timeout", help.StandardOutput, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Bad_options_are_usage_errors()
    {
        using var scratch = new TempDirectory();
        var result = await SpindleCli.RunAsync("mount", "--max-transfer", "1K", "memory:1M", scratch.Path);
        Assert.Equal(2, result.ExitCode);
        Assert.Contains("--max-transfer", result.StandardError, StringComparison.Ordinal);
        Assert.True(DaemonProcess.IsRoot, "these tests run as root (mount(2), loop devices)");
    }

    private static string Snapshot(System.Text.StringBuilder output)
    {
        lock (output)
        {
            return output.ToString();
        }
    }

    private static Storage.FileBlockDevice FileBlockDeviceAt(string path) => Storage.FileBlockDevice.Open(path, readOnly: true);
}
