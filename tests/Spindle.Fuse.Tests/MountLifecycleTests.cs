using Spindle.Fuse.Tests.Support;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>Mounting, refusing unusable directories, unmounting (busy or not, from inside or outside), stale mounts.</summary>
public sealed class MountLifecycleTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task Mounting_on_a_missing_directory_fails_with_ENOENT()
    {
        using var scratch = new TempDirectory();
        await using var device = new MemoryBlockDevice(1 << 20);
        var error = await Assert.ThrowsAsync<FuseMountException>(() => FuseMount.MountAsync(device, scratch.File("missing"), cancellationToken: TestContext.Current.CancellationToken));
        Assert.Equal(Posix.ENOENT, error.Errno);
        Assert.Contains("does not exist", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Mounting_on_a_file_fails_with_ENOTDIR()
    {
        using var scratch = new TempDirectory();
        var path = scratch.CreateSparseFile("plain", 10);
        await using var device = new MemoryBlockDevice(1 << 20);
        var error = await Assert.ThrowsAsync<FuseMountException>(() => FuseMount.MountAsync(device, path, cancellationToken: TestContext.Current.CancellationToken));
        Assert.Equal(Posix.ENOTDIR, error.Errno);
    }

    [Fact]
    public async Task Mounting_on_a_busy_directory_fails_with_EBUSY_and_leaves_the_mount_alone()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        await using var other = new MemoryBlockDevice(1 << 20);
        var error = await Assert.ThrowsAsync<FuseMountException>(() => FuseMount.MountAsync(other, mount.MountPoint, cancellationToken: TestContext.Current.CancellationToken));
        Assert.Equal(Posix.EBUSY, error.Errno);
        Assert.Contains("already a mount point", error.Message, StringComparison.Ordinal);

        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        file.WriteExactly(new byte[] { 1, 2, 3 }, 0);
        Assert.Equal(new byte[] { 1, 2, 3 }, Backends.ReadBacking(mount.Device.Inner, 0, 3));
    }

    [Fact]
    public async Task A_stale_mount_is_detected_and_replaced_by_the_next_mount()
    {
        await using var first = await TestMount.MemoryAsync(1 << 20);

        // The server's connection dies (as when its process is killed): the mount stays, every access fails.
        first.Mount.Abort();
        await first.Mount.Completion.WaitAsync(Bound, TestContext.Current.CancellationToken);
        Assert.Equal(-Posix.ENOTCONN, Posix.Open(first.FilePath, Posix.ORdOnly));
        Assert.True(MountTable.IsStale(first.MountPoint));

        // Refused when recovery is off, with the command that fixes it.
        await using var device = new MemoryBlockDevice(2 << 20);
        var refused = await Assert.ThrowsAsync<FuseMountException>(() => FuseMount.MountAsync(device, first.MountPoint,
            new FuseMountOptions { RecoverStaleMount = false }, cancellationToken: TestContext.Current.CancellationToken));
        Assert.Equal(Posix.EBUSY, refused.Errno);
        Assert.Contains("fusermount3 -u", refused.Message, StringComparison.Ordinal);

        await using (var second = await FuseMount.MountAsync(device, first.MountPoint, cancellationToken: TestContext.Current.CancellationToken))
        {
            Assert.Equal(2 << 20, new FileInfo(second.FilePath).Length);
            await first.Mount.DisposeAsync();

            // Disposing the dead mount did not touch its replacement.
            Assert.Equal(2 << 20, new FileInfo(second.FilePath).Length);
        }

        Assert.Null(MountTable.Find(first.MountPoint));
    }

    [Fact]
    public async Task Unmounting_a_busy_mount_detaches_it_and_serves_open_handles_until_closed()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        try
        {
            await Assert.ThrowsAsync<FuseMountException>(() => mount.Mount.UnmountAsync(lazy: false, TestContext.Current.CancellationToken));
            Assert.NotNull(MountTable.Find(mount.MountPoint));

            await mount.Mount.UnmountAsync(lazy: true, TestContext.Current.CancellationToken);
            Assert.Null(MountTable.Find(mount.MountPoint));
            Assert.False(mount.Mount.Completion.IsCompleted);

            // The open handle still works, all the way to the device.
            file.WriteExactly(Patterns.Generate(0, 4096), 0);
            Assert.Equal(Patterns.Generate(0, 4096), file.ReadExactly(0, 4096));
            Assert.Equal(Patterns.Generate(0, 4096), Backends.ReadBacking(mount.Device.Inner, 0, 4096));
        }
        finally
        {
            file.Dispose();
        }

        await mount.Mount.Completion.WaitAsync(Bound, TestContext.Current.CancellationToken);
    }

    [Fact]
    public async Task A_forced_umount_aborts_the_connection_even_while_busy()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);

        // umount -f on FUSE aborts the connection (the fallback of Abort without fusectl), then fails as busy.
        var result = await PeerTool.RunAsync("umount", ["-f", mount.MountPoint]);
        Assert.NotEqual(0, result.ExitCode);
        await mount.Mount.Completion.WaitAsync(Bound, TestContext.Current.CancellationToken);
        Assert.Equal(-Posix.ENOTCONN, Posix.PWrite(file.Fd, new byte[512], 0));
        Assert.True(MountTable.IsStale(mount.MountPoint));
    }

    [Fact]
    public async Task An_unmount_from_outside_ends_the_session()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        await PeerTool.RunCheckedAsync("umount", [mount.MountPoint]);
        await mount.Mount.Completion.WaitAsync(Bound, TestContext.Current.CancellationToken);
        Assert.Null(MountTable.Find(mount.MountPoint));
    }

    [Fact]
    public async Task Fusermount3_mounts_and_unmounts_as_an_unprivileged_user_would()
    {
        await using var mount = await TestMount.MemoryAsync(4 << 20, new FuseMountOptions { Mounter = FuseMounter.Fusermount });
        Assert.Equal(FuseMounter.Fusermount, mount.Mount.Mounter);
        var entry = MountTable.Find(mount.MountPoint);
        Assert.NotNull(entry);
        Assert.True(entry.IsSpindle);

        using (var file = PosixFile.Open(mount.FilePath, Posix.ORdWr))
        {
            file.WriteExactly(Patterns.Generate(4096, 4096), 4096);
            Assert.Equal(0, Posix.Fsync(file.Fd));
        }

        Assert.Equal(Patterns.Generate(4096, 4096), Backends.ReadBacking(mount.Device.Inner, 4096, 4096));
        await mount.Mount.UnmountAsync(cancellationToken: TestContext.Current.CancellationToken);
        Assert.Null(MountTable.Find(mount.MountPoint));
    }

    [Fact]
    public async Task The_mount_is_listed_as_a_spindle_mount_with_the_requested_limits()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20, new FuseMountOptions { FileName = "image.raw", FsName = "spindle:test" });
        Assert.Equal(Path.Combine(mount.MountPoint, "image.raw"), mount.FilePath);
        Assert.True(File.Exists(mount.FilePath));
        var entry = Assert.Single(MountTable.Read(), e => e.MountPoint == mount.MountPoint);
        Assert.Equal("fuse.spindle", entry.FileSystemType);
        Assert.Equal("spindle:test", entry.Source);
        var line = File.ReadLines("/proc/self/mountinfo").Single(l => l.Contains(" " + mount.MountPoint + " ", StringComparison.Ordinal));
        Assert.Contains("max_read=1048576", line, StringComparison.Ordinal);
    }

    [Fact]
    public void Bad_file_names_are_refused()
    {
        Assert.Throws<ArgumentException>(() => new FuseMountOptions { FileName = "a/b" }.Validated());
        Assert.Throws<ArgumentException>(() => new FuseMountOptions { FileName = ".." }.Validated());
        Assert.Throws<ArgumentException>(() => new FuseMountOptions { FileName = string.Empty }.Validated());
    }

    [Fact]
    public void Mountinfo_lines_are_parsed_with_their_escapes()
    {
        Assert.True(MountTable.TryParse(@"42 27 0:39 / /tmp/with\040space rw,nosuid,nodev,relatime shared:1 - fuse.spindle spindle:x rw,user_id=0", out var entry));
        Assert.Equal(new MountEntry(42, "0:39", "/tmp/with space", "fuse.spindle", "spindle:x"), entry);
        Assert.Equal(39, entry.ConnectionId);
        Assert.True(entry.IsSpindle);
        Assert.False(MountTable.TryParse("garbage", out _));
    }
}
