using Spindle.Fuse.Tests.Support;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>
/// fallocate on the file, mapped as Linux maps it for a block device: PUNCH_HOLE|KEEP_SIZE zeroes and may
/// deallocate (NBD WRITE_ZEROES), ZERO_RANGE zeroes and keeps the allocation (NO_HOLE), the rest is unsupported.
/// SEEK_DATA/SEEK_HOLE follow the device's allocation map.
/// </summary>
public sealed class FallocateTests
{
    [Theory]
    [InlineData(Backends.Memory)]
    [InlineData(Backends.File)]
    public async Task Punching_a_hole_zeroes_the_range_and_deallocates_it(string kind)
    {
        using var scratch = new TempDirectory();
        await using var mount = await TestMount.CreateAsync(Backends.Create(kind, 16 << 20, scratch));
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        file.WriteExactly(Patterns.Generate(0, 4 << 20, seed: 2), 0);
        var allocatedBefore = Allocated(mount.Device.Inner);

        Assert.Equal(0, Posix.Fallocate(file.Fd, Posix.FallocPunchHole | Posix.FallocKeepSize, 1 << 20, 2 << 20));

        Assert.Equal(new byte[2 << 20], file.ReadExactly(1 << 20, 2 << 20));
        Assert.Equal(new byte[2 << 20], Backends.ReadBacking(mount.Device.Inner, 1 << 20, 2 << 20));
        Assert.Equal(Patterns.Generate(0, 1 << 20, seed: 2), file.ReadExactly(0, 1 << 20));
        Assert.Equal(Patterns.Generate(3 << 20, 1 << 20, seed: 2), file.ReadExactly(3 << 20, 1 << 20));
        Assert.Contains(mount.Device.Calls, c => c is { Operation: "zero", Offset: 1 << 20, Length: 2 << 20, ZeroFlags: ZeroFlags.None });
        Assert.True(Allocated(mount.Device.Inner) <= allocatedBefore - (2 << 20), "the punched range is still allocated");
        Assert.Equal(16 << 20, new FileInfo(mount.FilePath).Length);
    }

    [Fact]
    public async Task Zero_range_zeroes_and_keeps_the_range_allocated()
    {
        await using var mount = await TestMount.MemoryAsync(16 << 20);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        file.WriteExactly(Patterns.Generate(0, 1 << 20, seed: 3), 0);

        Assert.Equal(0, Posix.Fallocate(file.Fd, Posix.FallocZeroRange | Posix.FallocKeepSize, 4096, 8192));
        Assert.Equal(0, Posix.Fallocate(file.Fd, Posix.FallocZeroRange, 65536, 4096));

        Assert.Equal(new byte[8192], file.ReadExactly(4096, 8192));
        Assert.Equal(new byte[4096], file.ReadExactly(65536, 4096));
        Assert.Equal(Patterns.Generate(0, 4096, seed: 3), file.ReadExactly(0, 4096));
        Assert.Equal(2, mount.Device.Calls.Count(c => c is { Operation: "zero", ZeroFlags: ZeroFlags.NoHole }));
    }

    [Fact]
    public async Task Ranges_past_the_end_are_clamped_or_refused()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        Assert.Equal(0, Posix.Fallocate(file.Fd, Posix.FallocPunchHole | Posix.FallocKeepSize, (1 << 20) - 4096, 1 << 20));
        Assert.Contains(mount.Device.Calls, c => c is { Operation: "zero", Offset: (1 << 20) - 4096, Length: 4096 });
        Assert.Equal(0, Posix.Fallocate(file.Fd, Posix.FallocPunchHole | Posix.FallocKeepSize, 2 << 20, 4096));

        // Without KEEP_SIZE the file would have to grow: a disk cannot.
        Assert.Equal(-Posix.ENOSPC, Posix.Fallocate(file.Fd, Posix.FallocZeroRange, (1 << 20) - 4096, 8192));
        Assert.Equal(1 << 20, new FileInfo(mount.FilePath).Length);
    }

    [Fact]
    public async Task Plain_preallocation_is_not_supported_as_on_a_block_device()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        Assert.Equal(-Posix.EOPNOTSUPP, Posix.Fallocate(file.Fd, 0, 0, 4096));
        Assert.Equal(-Posix.EOPNOTSUPP, Posix.Fallocate(file.Fd, Posix.FallocKeepSize, 0, 4096));

        // The real tool agrees.
        var result = await PeerTool.RunAsync("fallocate", ["-o", "0", "-l", "4096", mount.FilePath]);
        Assert.NotEqual(0, result.ExitCode);
        Assert.Contains("not supported", result.StandardError, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public async Task Without_write_zeroes_in_the_device_punching_is_not_supported()
    {
        await using var mount = await TestMount.CreateAsync(new MemoryBlockDevice(1 << 20), configure: device => device.HiddenFeatures = BlockDeviceFeatures.WriteZeroes);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        Assert.Equal(-Posix.EOPNOTSUPP, Posix.Fallocate(file.Fd, Posix.FallocPunchHole | Posix.FallocKeepSize, 0, 4096));
        Assert.Equal(0, mount.Device.Count("zero"));
    }

    [Fact]
    public async Task The_fallocate_tool_punches_and_zeroes()
    {
        await using var mount = await TestMount.MemoryAsync(4 << 20);
        using (var file = PosixFile.Open(mount.FilePath, Posix.ORdWr))
        {
            file.WriteExactly(Patterns.Generate(0, 4 << 20, seed: 8), 0);
        }

        await PeerTool.RunCheckedAsync("fallocate", ["--punch-hole", "--offset", "0", "--length", "1MiB", mount.FilePath]);
        await PeerTool.RunCheckedAsync("fallocate", ["--zero-range", "--keep-size", "--offset", "2MiB", "--length", "1MiB", mount.FilePath]);

        using var check = PosixFile.Open(mount.FilePath, Posix.ORdOnly);
        Assert.Equal(new byte[1 << 20], check.ReadExactly(0, 1 << 20));
        Assert.Equal(Patterns.Generate(1 << 20, 1 << 20, seed: 8), check.ReadExactly(1 << 20, 1 << 20));
        Assert.Equal(new byte[1 << 20], check.ReadExactly(2 << 20, 1 << 20));
    }

    [Theory]
    [InlineData(Backends.Memory)]
    [InlineData(Backends.File)]
    public async Task Seek_data_and_seek_hole_follow_the_allocation(string kind)
    {
        using var scratch = new TempDirectory();
        await using var mount = await TestMount.CreateAsync(Backends.Create(kind, 16 << 20, scratch));
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        file.WriteExactly(Patterns.Generate(4 << 20, 1 << 20), 4 << 20);

        Assert.Equal(4 << 20, Posix.LSeek(file.Fd, 0, Posix.SeekData));
        Assert.Equal(0, Posix.LSeek(file.Fd, 0, Posix.SeekHole));
        Assert.Equal(5 << 20, Posix.LSeek(file.Fd, 4 << 20, Posix.SeekHole));
        Assert.Equal(-Posix.ENXIO, Posix.LSeek(file.Fd, 6 << 20, Posix.SeekData));
        Assert.Equal(-Posix.ENXIO, Posix.LSeek(file.Fd, 16 << 20, Posix.SeekHole));
    }

    private static long Allocated(BlockDevice device) => device switch
    {
        MemoryBlockDevice memory => memory.AllocatedBytes,
        FileBlockDevice file => AllocatedFileBytes(file.Path),
        _ => throw new ArgumentOutOfRangeException(nameof(device)),
    };

    private static long AllocatedFileBytes(string path)
    {
        // st_blocks, in 512-byte units, via stat(1).
        var result = PeerTool.RunCheckedAsync("stat", ["-c", "%b", path]).GetAwaiter().GetResult();
        return long.Parse(result.StandardOutput.Trim(), System.Globalization.CultureInfo.InvariantCulture) * 512;
    }
}
