using System.Text.Json;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// <c>spindle copy</c> (the real binary) between the kinds of end it opens as block devices: NBD (Spindle's server
/// in-process, nbdkit), files, and <c>null:</c> on either side. NBD to file and back against nbdkit, qemu-nbd and
/// nbd-server are in <see cref="NbdkitTests"/>, <see cref="QemuNbdTests"/> and <see cref="NbdServerTests"/>.
/// </summary>
public sealed class CopyTests
{
    private const int Size = 4 << 20;

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    private static void AssertExit(int expected, ProcessResult result) => Assert.True(result.ExitCode == expected, $"expected exit {expected}: {result}");

    private static JsonElement Json(ProcessResult result) => JsonDocument.Parse(result.StandardOutput).RootElement.Clone();

    [Fact]
    public async Task Copy_nbd_to_null_reads_only_the_data_and_keeps_nothing()
    {
        var device = new RecordingDevice(new MemoryBlockDevice(Size));
        await using var server = await TestServer.StartAsync(device, "disk");
        await using (var client = await NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: Token))
        {
            await client.WriteAsync(1 << 20, Patterns.Generate(1 << 20, 65536, seed: 7), Token);
            await client.WriteAsync(3 << 20, Patterns.Generate(3 << 20, 131072, seed: 7), Token);
        }

        device.Clear();
        var copy = await SpindleCli.RunAsync("copy", "--json", server.Uri("disk"), "null:");
        AssertExit(0, copy);
        var json = Json(copy);
        Assert.Equal("nbd", json.GetProperty("source_info").GetProperty("kind").GetString());
        Assert.Equal("null", json.GetProperty("destination_info").GetProperty("kind").GetString());
        Assert.Equal(192 * 1024, json.GetProperty("data_bytes").GetInt64());
        Assert.Equal(Size - (192 * 1024), json.GetProperty("zeroed_bytes").GetInt64());

        // Block status said where the data is: only those 192 KiB were read from the server, the holes never.
        Assert.Equal(192 * 1024, device.Reads.Sum(read => read.Length));
        Assert.All(device.Reads, read => Assert.True(read.Offset >= 1 << 20 && read.Offset < (3 << 20) + 131072, $"read at {read.Offset}"));

        device.Clear();
        var everything = await SpindleCli.RunAsync("copy", "--json", "--no-extents", server.Uri("disk"), "null:");
        AssertExit(0, everything);
        Assert.False(Json(everything).GetProperty("source_info").GetProperty("extents").GetBoolean());
        Assert.Equal(Size, device.Reads.Sum(read => read.Length));
    }

    [Fact]
    public async Task Copy_nbdkit_to_null_reads_every_byte()
    {
        // nbdkit's pattern plugin: every 8 bytes hold their own offset, so nothing reads as zero blocks.
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["pattern", "size=16M"]);
        var copy = await SpindleCli.RunAsync("copy", "--json", "-C", "2", nbdkit.Uri(), "null:");
        AssertExit(0, copy);
        var json = Json(copy);
        Assert.Equal(16 << 20, json.GetProperty("bytes").GetInt64());
        Assert.Equal(16 << 20, json.GetProperty("data_bytes").GetInt64());
    }

    [Fact]
    public async Task Copy_file_to_file_is_exact_and_keeps_holes()
    {
        using var directory = new TempDirectory();
        var source = directory.CreateSparseFile("source.img", 24 << 20);
        await using (var file = new FileStream(source, FileMode.Open, FileAccess.Write))
        {
            foreach (var (offset, length) in new (long, int)[] { (0, 1 << 20), (5 << 20, 1 << 20), ((17 << 20) + 100, 1000) })
            {
                file.Seek(offset, SeekOrigin.Begin);
                await file.WriteAsync(Patterns.Generate(offset, length, seed: 9), Token);
            }
        }

        var destination = directory.File("copy.img");
        var copy = await SpindleCli.RunAsync("copy", "--json", "-R", "4", source, destination);
        AssertExit(0, copy);
        var json = Json(copy);
        Assert.Equal("file", json.GetProperty("source_info").GetProperty("kind").GetString());
        Assert.Equal("file", json.GetProperty("destination_info").GetProperty("kind").GetString());
        Assert.True(json.GetProperty("source_info").GetProperty("extents").GetBoolean());

        // -R 4 with files at both ends: the default 4 connections' worth, 16 requests.
        Assert.Equal(16, json.GetProperty("requests_in_flight").GetInt32());
        Assert.Equal(0, json.GetProperty("zeroed_bytes").GetInt64());
        Assert.True(json.GetProperty("skipped_bytes").GetInt64() >= (24 << 20) - (3 << 20));
        await PeerTool.RunCheckedAsync("cmp", [source, destination]);
        Assert.Equal(await NbdkitTests.AllocatedBytesAsync(source), await NbdkitTests.AllocatedBytesAsync(destination));

        // Again onto the copy, now dirty: an existing file is emptied first, so the result is the same.
        await using (var file = new FileStream(destination, FileMode.Open, FileAccess.Write))
        {
            await file.WriteAsync(Enumerable.Repeat((byte)0x77, 3 << 20).ToArray(), Token);
        }

        var again = await SpindleCli.RunAsync("copy", "-q", source, destination);
        AssertExit(0, again);
        await PeerTool.RunCheckedAsync("cmp", [source, destination]);
    }

    [Fact]
    public async Task Null_source_zeroes_an_export_and_a_file_and_needs_a_size()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(Size), "disk");
        await using (var client = await NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: Token))
        {
            await client.WriteAsync(0, Enumerable.Repeat((byte)0x5a, Size).ToArray(), Token);
        }

        var wipe = await SpindleCli.RunAsync("copy", "--json", "null:4M", server.Uri("disk"));
        AssertExit(0, wipe);
        var json = Json(wipe);
        Assert.Equal("null", json.GetProperty("source_info").GetProperty("kind").GetString());
        Assert.Equal(0, json.GetProperty("data_bytes").GetInt64());
        Assert.Equal(Size, json.GetProperty("zeroed_bytes").GetInt64());
        await using (var check = await NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: Token))
        {
            var back = new byte[Size];
            await check.ReadAsync(0, back, Token);
            Assert.All(back, b => Assert.Equal(0, b));
        }

        using var directory = new TempDirectory();
        var file = directory.File("zero.img");
        var toFile = await SpindleCli.RunAsync("copy", "--json", "null:1M", file);
        AssertExit(0, toFile);
        Assert.Equal(1 << 20, Json(toFile).GetProperty("skipped_bytes").GetInt64());
        Assert.Equal(1 << 20, new FileInfo(file).Length);
        Assert.Equal(0, await NbdkitTests.AllocatedBytesAsync(file));

        var sizeless = await SpindleCli.RunAsync("copy", "null:", file);
        AssertExit(2, sizeless);
        Assert.Contains("spindle: error: null: as the source needs a size: null:SIZE", sizeless.StandardError, StringComparison.Ordinal);
        var bad = await SpindleCli.RunAsync("copy", "null:lots", file);
        AssertExit(2, bad);
        Assert.Contains("'lots' is not a size", bad.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Copy_to_an_export_with_a_minimum_block_size_sends_only_whole_blocks()
    {
        var device = new RecordingDevice(new MemoryBlockDevice(Size));
        await using var server = await TestServer.StartAsync(catalog =>
            catalog.Add(new Export(new ExportOptions { Name = "aligned", BlockSizes = new BlockSizeConstraints(4096, 4096, 65536) }, device)));
        using var directory = new TempDirectory();
        var source = directory.CreateSparseFile("source.img", Size);
        await using (var file = new FileStream(source, FileMode.Open, FileAccess.Write))
        {
            file.Seek(5000, SeekOrigin.Begin);
            await file.WriteAsync(Patterns.Generate(5000, 300_000, seed: 5), Token);
        }

        // An unaligned request size and 512-byte zero detection are rounded to the export's 4096-byte blocks, and
        // the request size is capped at its 64 KiB maximum.
        var copy = await SpindleCli.RunAsync("copy", "--json", "--request-size", "6000", "-S", "512", source, server.Uri("aligned"));
        AssertExit(0, copy);
        Assert.Equal(4096, Json(copy).GetProperty("request_size").GetInt32());
        var big = await SpindleCli.RunAsync("copy", "--json", "--request-size", "1M", source, server.Uri("aligned"));
        AssertExit(0, big);
        Assert.Equal(65536, Json(big).GetProperty("request_size").GetInt32());

        // Aligned requests go straight through: nothing was read back to patch a partial block.
        Assert.Empty(device.Reads);
        Assert.NotEmpty(device.Writes);
        Assert.All(device.Writes, write => Assert.True(write.Offset % 4096 == 0 && write.Length % 4096 == 0, $"write {write.Offset}+{write.Length}"));

        var back = directory.File("back.img");
        AssertExit(0, await SpindleCli.RunAsync("copy", server.Uri("aligned"), back));
        await PeerTool.RunCheckedAsync("cmp", [source, back]);
    }

    /// <summary>Passes every call to another device and records the reads and writes the server made.</summary>
    private sealed class RecordingDevice(BlockDevice inner) : BlockDevice
    {
        private readonly Lock _lock = new();
        private readonly List<(long Offset, long Length)> _reads = [];
        private readonly List<(long Offset, long Length)> _writes = [];

        public override long Size => inner.Size;

        public override BlockDeviceFeatures Features => inner.Features;

        public IReadOnlyList<(long Offset, long Length)> Reads => Snapshot(_reads);

        public IReadOnlyList<(long Offset, long Length)> Writes => Snapshot(_writes);

        public void Clear()
        {
            lock (_lock)
            {
                _reads.Clear();
                _writes.Clear();
            }
        }

        public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
        {
            Record(_reads, offset, destination.Length);
            return inner.ReadAsync(offset, destination, cancellationToken);
        }

        public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
        {
            Record(_writes, offset, source.Length);
            return inner.WriteAsync(offset, source, fua, cancellationToken);
        }

        public override ValueTask FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);

        public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
            inner.TrimAsync(offset, length, fua, cancellationToken);

        public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
            inner.WriteZeroesAsync(offset, length, flags, cancellationToken);

        public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
            inner.GetExtentsAsync(offset, length, extents, cancellationToken);

        protected override ValueTask DisposeAsyncCore() => inner.DisposeAsync();

        private void Record(List<(long Offset, long Length)> list, long offset, long length)
        {
            lock (_lock)
            {
                list.Add((offset, length));
            }
        }

        private List<(long Offset, long Length)> Snapshot(List<(long Offset, long Length)> list)
        {
            lock (_lock)
            {
                return [.. list];
            }
        }
    }
}
