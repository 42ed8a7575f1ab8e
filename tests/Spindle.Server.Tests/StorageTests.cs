using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>The file, memory and null backends on their own (the null one also served to a real peer).</summary>
public sealed class StorageTests
{
    [Fact]
    public async Task File_backend_reports_the_holes_of_a_sparse_file()
    {
        using var directory = new TempDirectory();
        var path = directory.CreateSparseFile("sparse.img", 16 * 1024 * 1024);
        await using (var stream = new FileStream(path, FileMode.Open, FileAccess.Write))
        {
            stream.Position = 4 * 1024 * 1024;
            stream.Write(Patterns.Generate(0, 1024 * 1024));
        }

        await using var device = FileBlockDevice.Open(path, readOnly: true);
        Assert.Equal(16 * 1024 * 1024, device.Size);
        Assert.True(device.Features.HasFlag(BlockDeviceFeatures.Extents));
        Assert.False(device.Features.HasFlag(BlockDeviceFeatures.Write));
        var extents = new ExtentList(100);
        await device.GetExtentsAsync(0, device.Size, extents, CancellationToken.None);
        Assert.Equal(
            [new Extent(4 * 1024 * 1024, AllocationFlags.Hole | AllocationFlags.Zero), new Extent(1024 * 1024, AllocationFlags.Data), new Extent(11 * 1024 * 1024, AllocationFlags.Hole | AllocationFlags.Zero)],
            extents.Items.ToArray());

        // A range starting inside data and ending inside a hole is clipped at both ends.
        extents.Clear(100);
        await device.GetExtentsAsync(5 * 1024 * 1024 - 4096, 8192, extents, CancellationToken.None);
        Assert.Equal([new Extent(4096, AllocationFlags.Data), new Extent(4096, AllocationFlags.Hole | AllocationFlags.Zero)], extents.Items.ToArray());

        // A full list stops early; at least one extent is always reported.
        extents.Clear(1);
        await device.GetExtentsAsync(0, device.Size, extents, CancellationToken.None);
        Assert.Equal(1, extents.Count);
    }

    [Fact]
    public async Task File_backend_trims_and_zeroes_with_fallocate()
    {
        using var directory = new TempDirectory();
        var path = directory.CreateSparseFile("disk.img", 8 * 1024 * 1024);
        await using var device = FileBlockDevice.Open(path, readOnly: false);
        await device.WriteAsync(0, Patterns.Generate(0, 8 * 1024 * 1024), fua: false, CancellationToken.None);
        await device.TrimAsync(1024 * 1024, 1024 * 1024, fua: false, CancellationToken.None);
        await device.WriteZeroesAsync(3 * 1024 * 1024, 1024 * 1024, ZeroFlags.None, CancellationToken.None);
        await device.WriteZeroesAsync(5 * 1024 * 1024, 1024 * 1024, ZeroFlags.NoHole | ZeroFlags.Fua, CancellationToken.None);
        await device.WriteZeroesAsync(7 * 1024 * 1024, 12345, ZeroFlags.FastOnly, CancellationToken.None);
        await device.FlushAsync(CancellationToken.None);

        var extents = new ExtentList(100);
        await device.GetExtentsAsync(0, device.Size, extents, CancellationToken.None);
        var holes = extents.Items.ToArray().Where(e => e.Flags != AllocationFlags.Data).Sum(e => e.Length);
        Assert.True(holes >= 2 * 1024 * 1024, $"expected the trimmed and zeroed megabytes to be holes, got {holes} bytes of holes");

        var content = new byte[8 * 1024 * 1024];
        await device.ReadAsync(0, content, CancellationToken.None);
        var expected = Patterns.Generate(0, 8 * 1024 * 1024);
        Array.Clear(expected, 3 * 1024 * 1024, 1024 * 1024);
        Array.Clear(expected, 5 * 1024 * 1024, 1024 * 1024);
        Array.Clear(expected, 7 * 1024 * 1024, 12345);
        Assert.Equal(expected[..(1024 * 1024)], content[..(1024 * 1024)]);
        Assert.Equal(expected[(2 * 1024 * 1024)..], content[(2 * 1024 * 1024)..]);
    }

    [Fact]
    public async Task File_backend_fua_write_lands_in_the_file()
    {
        using var directory = new TempDirectory();
        var path = directory.CreateSparseFile("disk.img", 1024 * 1024);
        await using (var device = FileBlockDevice.Open(path, readOnly: false))
        {
            await device.WriteAsync(4096, Patterns.Generate(4096, 4096), fua: true, CancellationToken.None);
        }

        var bytes = await File.ReadAllBytesAsync(path);
        Assert.Equal(Patterns.Generate(4096, 4096), bytes[4096..8192]);
    }

    [Fact]
    public async Task File_backend_gives_clear_errors()
    {
        using var directory = new TempDirectory();
        var missing = directory.File("missing.img");
        var exception = Assert.Throws<FileNotFoundException>(() => FileBlockDevice.Open(missing, readOnly: false));
        Assert.Contains("does not exist", exception.Message, StringComparison.Ordinal);

        await using var created = FileBlockDevice.Open(missing, readOnly: false, createSize: 1 << 20);
        Assert.Equal(1 << 20, new FileInfo(missing).Length);
    }

    [Fact]
    public async Task Read_only_file_backend_refuses_writes_with_eperm()
    {
        using var directory = new TempDirectory();
        await using var device = FileBlockDevice.Open(directory.CreateSparseFile("ro.img", 65536), readOnly: true);
        var exception = await Assert.ThrowsAsync<BlockDeviceException>(async () => await device.WriteAsync(0, new byte[10], fua: false, CancellationToken.None));
        Assert.Equal(NbdError.NotPermitted, exception.Error);
    }

    [Fact]
    public async Task Memory_backend_never_stores_a_chunk_of_zeroes()
    {
        await using var device = new MemoryBlockDevice(64L << 30);
        Assert.Equal(0, device.AllocatedBytes);
        await device.WriteAsync(1L << 35, new byte[1 << 20], fua: false, CancellationToken.None);
        Assert.Equal(0, device.AllocatedBytes);

        await device.WriteAsync(100, Patterns.Generate(100, 10), fua: false, CancellationToken.None);
        Assert.Equal(65536, device.AllocatedBytes);
        await device.WriteAsync(100, new byte[10], fua: false, CancellationToken.None);
        Assert.Equal(0, device.AllocatedBytes);

        await device.WriteAsync(0, Patterns.Generate(0, 300_000), fua: false, CancellationToken.None);
        await device.WriteZeroesAsync(65536, 65536, ZeroFlags.NoHole, CancellationToken.None);
        await device.TrimAsync(131072, 10, fua: false, CancellationToken.None);
        var content = new byte[300_000];
        await device.ReadAsync(0, content, CancellationToken.None);
        var expected = Patterns.Generate(0, 300_000);
        Array.Clear(expected, 65536, 65546);
        Assert.Equal(expected, content);

        var extents = new ExtentList(100);
        await device.GetExtentsAsync(0, 1 << 20, extents, CancellationToken.None);
        Assert.Equal(
            [new Extent(65536, AllocationFlags.Data), new Extent(65536, AllocationFlags.Hole | AllocationFlags.Zero), new Extent(196608, AllocationFlags.Data), new Extent((1 << 20) - 327680, AllocationFlags.Hole | AllocationFlags.Zero)],
            extents.Items.ToArray());
    }

    [Fact]
    public async Task Memory_backend_serves_concurrent_writers_without_losing_bytes()
    {
        await using var device = new MemoryBlockDevice(8 * 1024 * 1024);
        await Parallel.ForAsync(0, 2048, async (i, token) =>
        {
            // Neighbouring 4 KiB writes share 64 KiB chunks: they must not overwrite each other.
            await device.WriteAsync(i * 4096L, Patterns.Generate(i * 4096L, 4096, seed: 3), fua: false, token);
        });
        var content = new byte[8 * 1024 * 1024];
        await device.ReadAsync(0, content, CancellationToken.None);
        Assert.Equal(Patterns.Generate(0, 8 * 1024 * 1024, seed: 3), content);
    }

    [Fact]
    public async Task Null_backend_reads_zeroes_and_discards_everything_written()
    {
        // Any size, up to the largest an NBD export can have.
        await using var device = new NullBlockDevice(long.MaxValue);
        Assert.Equal(long.MaxValue, device.Size);
        var expected = BlockDeviceFeatures.Write | BlockDeviceFeatures.Flush | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
                       BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero | BlockDeviceFeatures.Cache |
                       BlockDeviceFeatures.Extents | BlockDeviceFeatures.SharedCache;
        Assert.Equal(expected, device.Features);
        Assert.True(device.SubmitsWithoutBlocking);

        var offset = long.MaxValue - (1 << 20);
        await device.WriteAsync(offset, Patterns.Generate(offset, 65536), fua: true, CancellationToken.None);
        Assert.True(device.TryWriteImmediate(0, Patterns.Generate(0, 4096)));
        await device.WriteZeroesAsync(0, 1 << 20, ZeroFlags.NoHole | ZeroFlags.FastOnly | ZeroFlags.Fua, CancellationToken.None);
        await device.TrimAsync(4096, 8192, fua: true, CancellationToken.None);
        await device.CacheAsync(0, 4096, CancellationToken.None);
        await device.FlushAsync(CancellationToken.None);

        // A buffer full of bytes comes back all zero, through both read paths: nothing written was kept.
        var read = Enumerable.Repeat((byte)0xa5, 65536).ToArray();
        await device.ReadAsync(offset, read, CancellationToken.None);
        Assert.All(read, b => Assert.Equal(0, b));
        var immediate = Enumerable.Repeat((byte)0x5a, 4096).ToArray();
        Assert.True(device.TryReadImmediate(0, immediate));
        Assert.All(immediate, b => Assert.Equal(0, b));

        // The whole range asked about is one hole that reads as zeroes.
        var extents = new ExtentList(16);
        await device.GetExtentsAsync(12345, 1L << 40, extents, CancellationToken.None);
        Assert.Equal([new Extent(1L << 40, AllocationFlags.Hole | AllocationFlags.Zero)], extents.Items.ToArray());

        Assert.Throws<ArgumentOutOfRangeException>(() => new NullBlockDevice(-1));
        await using var empty = new NullBlockDevice(0);
        Assert.Equal(0, empty.Size);
    }

    [Fact]
    public async Task Null_backend_served_reads_as_one_zero_hole_to_nbdinfo_and_takes_qemu_io_writes()
    {
        await using var server = await TestServer.StartAsync(new NullBlockDevice(1L << 40));
        var map = await PeerTool.RunCheckedAsync("nbdinfo", ["--map", server.Uri()]);

        // nbdinfo --map: "offset length type description"; type 3 is hole,zero.
        var fields = map.StandardOutput.Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Equal(["0", (1L << 40).ToString(System.Globalization.CultureInfo.InvariantCulture), "3"], fields[..3]);

        var io = await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x33 1M 64k", "-c", "flush", "-c", "read -P 0 1M 64k", server.Uri()]);
        Assert.DoesNotContain("Pattern verification failed", io.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("read 65536/65536 bytes", io.StandardOutput, StringComparison.Ordinal);
    }

    [Fact]
    public void Memory_backend_refuses_absurd_sizes()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new MemoryBlockDevice(MemoryBlockDevice.MaxSize + 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => new MemoryBlockDevice(-1));
    }
}
