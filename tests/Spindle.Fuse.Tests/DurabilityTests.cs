using Spindle.Fuse.Tests.Support;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>
/// fsync and fdatasync reach the device as FLUSH; writes through O_SYNC/O_DSYNC handles as FUA (or write +
/// FLUSH on a device without FUA), so they are durable when write() returns; close costs nothing.
/// </summary>
public sealed class DurabilityTests
{
    [Fact]
    public async Task Fsync_and_fdatasync_flush_the_device()
    {
        await using var mount = await TestMount.MemoryAsync();
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        file.WriteExactly(Patterns.Generate(0, 4096), 0);
        Assert.Equal(0, mount.Device.Count("flush"));

        Assert.Equal(0, Posix.Fsync(file.Fd));
        Assert.Equal(1, mount.Device.Count("flush"));
        Assert.Equal(0, Posix.Fdatasync(file.Fd));
        Assert.Equal(2, mount.Device.Count("flush"));

        // syncfs succeeds; the kernel forwards it (FUSE_SYNCFS) only to virtiofs servers, so it flushes nothing here.
        Assert.Equal(0, Posix.Syncfs(file.Fd));

        // The flush came after the write it covers.
        var calls = mount.Device.Calls;
        Assert.True(calls.ToList().FindIndex(c => c.Operation == "write") < calls.ToList().FindIndex(c => c.Operation == "flush"));
    }

    [Theory]
    [InlineData(Posix.OSync)]
    [InlineData(Posix.ODsync)]
    [InlineData(Posix.OSync | Posix.ODirect)]
    public async Task Writes_through_a_synchronous_handle_are_FUA(int syncFlag)
    {
        await using var mount = await TestMount.MemoryAsync();
        var data = Posix.AlignedBuffer(8192);
        Patterns.Fill(data, 0, seed: 4);

        using (var plain = PosixFile.Open(mount.FilePath, Posix.ORdWr))
        {
            plain.WriteExactly(data, 0);
        }

        using (var synchronous = PosixFile.Open(mount.FilePath, Posix.ORdWr | syncFlag))
        {
            synchronous.WriteExactly(data, 65536);
        }

        var writes = mount.Device.Calls.Where(c => c.Operation == "write").ToList();
        Assert.Contains(writes, c => c.Offset == 0 && !c.Fua);
        Assert.Contains(writes, c => c.Offset == 65536 && c.Fua);
        Assert.DoesNotContain(writes, c => c.Offset == 0 && c.Fua);
        Assert.Equal(data, Backends.ReadBacking(mount.Device.Inner, 65536, data.Length));
    }

    [Fact]
    public async Task Without_FUA_a_synchronous_write_is_followed_by_a_flush()
    {
        await using var mount = await TestMount.CreateAsync(new MemoryBlockDevice(16 << 20), configure: device => device.HiddenFeatures = BlockDeviceFeatures.Fua);

        using (var synchronous = PosixFile.Open(mount.FilePath, Posix.ORdWr | Posix.ODsync))
        {
            synchronous.WriteExactly(Patterns.Generate(0, 4096), 0);
        }

        var calls = mount.Device.Calls.Where(c => c.Operation is "write" or "flush").ToList();
        Assert.Equal(["write", "flush"], calls.Select(c => c.Operation));
        Assert.False(calls[0].Fua);
    }

    [Fact]
    public async Task Closing_a_handle_does_not_flush()
    {
        await using var mount = await TestMount.MemoryAsync();
        using (var file = PosixFile.Open(mount.FilePath, Posix.ORdWr))
        {
            file.WriteExactly(Patterns.Generate(0, 4096), 0);
        }

        Assert.Equal(1, mount.Device.Count("write"));
        Assert.Equal(0, mount.Device.Count("flush"));
    }

    [Fact]
    public async Task Unmounting_flushes_the_device()
    {
        var mount = await TestMount.MemoryAsync();
        try
        {
            using (var file = PosixFile.Open(mount.FilePath, Posix.ORdWr))
            {
                file.WriteExactly(Patterns.Generate(0, 4096), 0);
            }

            await mount.Mount.DisposeAsync();
            Assert.Equal(1, mount.Device.Count("flush"));
            Assert.Null(MountTable.Find(mount.MountPoint));
        }
        finally
        {
            await mount.DisposeAsync();
        }
    }

    [Fact]
    public async Task Writes_to_a_file_backend_are_in_the_file_once_fsync_returns()
    {
        using var scratch = new TempDirectory();
        var path = scratch.CreateSparseFile("disk.img", 16 << 20);
        await using var mount = await TestMount.CreateAsync(FileBlockDevice.Open(path, readOnly: false));
        var data = Patterns.Generate(3 << 20, 1 << 20, seed: 12);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        file.WriteExactly(data, 3 << 20);
        Assert.Equal(0, Posix.Fsync(file.Fd));

        using var direct = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var back = new byte[data.Length];
        Assert.Equal(data.Length, RandomAccess.Read(direct, back, 3 << 20));
        Assert.Equal(data, back);
    }
}
