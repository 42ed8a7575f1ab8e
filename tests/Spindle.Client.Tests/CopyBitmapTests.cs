using System.Text.Json;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// <c>spindle copy --bitmap NAME</c> (the real binary) against Spindle's server in-process, whose device offers a
/// <c>qemu:dirty-bitmap:NAME</c> context the test controls: its granularity, and how few extents each answer
/// carries (a server may describe less than was asked). The device records every READ the copy made. Against
/// qemu-nbd -B and spindle serve of a qcow2 bitmap: tests/Spindle.Interop.Tests/CopyBitmapInteropTests.cs.
/// </summary>
public sealed class CopyBitmapTests
{
    private const int Size = 8 << 20;
    private const string Bitmap = "b1";

    private static void AssertExit(int expected, ProcessResult result) => Assert.True(result.ExitCode == expected, $"expected exit {expected}: {result}");

    [Theory]
    [InlineData(65536, 1000)]
    [InlineData(4096, 1)]
    [InlineData(512, 2)]
    public async Task Only_the_dirty_ranges_are_read_and_the_copy_matches_the_source(int granularity, int extentsPerAnswer)
    {
        var inner = new MemoryBlockDevice(Size);
        await inner.WriteAsync(0, Patterns.Generate(0, 6 << 20, seed: 1), fua: false, TestContext.Current.CancellationToken);
        var device = new BitmapDevice(inner, Bitmap, granularity, extentsPerAnswer);
        await using var server = await TestServer.StartAsync(device, "disk");
        using var directory = new TempDirectory();
        var backup = directory.File("backup.img");
        AssertExit(0, await SpindleCli.RunAsync("copy", server.Uri("disk"), backup));

        // What changed since: data (at unaligned places), zeroes over data, data where there were zeroes.
        (long Offset, int Length)[] writes = [((1 << 20) + 1000, 5000), (3 << 20, 200_000), (7 << 20, 4096)];
        foreach (var (offset, length) in writes)
        {
            await inner.WriteAsync(offset, Patterns.Generate(offset, length, seed: 2), fua: false, TestContext.Current.CancellationToken);
            device.MarkDirty(offset, length);
        }

        const long ZeroedAt = 4 << 20;
        const int ZeroedLength = 256 << 10;
        await inner.WriteZeroesAsync(ZeroedAt, ZeroedLength, ZeroFlags.None, TestContext.Current.CancellationToken);
        device.MarkDirty(ZeroedAt, ZeroedLength);

        // A change on the destination in a clean range: an incremental copy leaves it alone.
        const long Marker = 2 << 20;
        await using (var file = new FileStream(backup, FileMode.Open, FileAccess.Write))
        {
            file.Position = Marker;
            await file.WriteAsync(Enumerable.Repeat((byte)0xee, 512).ToArray(), TestContext.Current.CancellationToken);
        }

        device.Clear();
        var copy = await SpindleCli.RunAsync("copy", "--json", "--bitmap", Bitmap, server.Uri("disk"), backup);
        AssertExit(0, copy);
        var json = JsonDocument.Parse(copy.StandardOutput).RootElement;
        var dirty = device.DirtyRanges();
        Assert.Equal("qemu:dirty-bitmap:" + Bitmap, json.GetProperty("bitmap").GetString());
        Assert.Equal(dirty.Sum(range => range.Length), json.GetProperty("dirty_bytes").GetInt64());
        Assert.Equal(dirty.Count, json.GetProperty("dirty_ranges").GetInt32());
        Assert.Equal(json.GetProperty("bytes").GetInt64(), json.GetProperty("data_bytes").GetInt64() + json.GetProperty("zeroed_bytes").GetInt64());
        Assert.True(json.GetProperty("zeroed_bytes").GetInt64() >= ZeroedLength, copy.StandardOutput);

        // Every READ lay inside a dirty range, none in the range that reads as zeroes (block status said so).
        var reads = device.Reads;
        Assert.NotEmpty(reads);
        Assert.All(reads, read => Assert.Contains(dirty, range => read.Offset >= range.Offset && read.Offset + read.Length <= range.Offset + range.Length));
        Assert.DoesNotContain(reads, read => read.Offset < ZeroedAt + ZeroedLength && read.Offset + read.Length > ZeroedAt);
        Assert.True(reads.Sum(read => read.Length) <= dirty.Sum(range => range.Length) - ZeroedLength);

        // One allocation answer serves several nearby dirty ranges: fewer questions than ranges.
        Assert.True(device.AllocationQueries < dirty.Count, $"{device.AllocationQueries} base:allocation queries for {dirty.Count} dirty ranges");

        // The destination is the source again, except the marker in the clean range.
        var expected = new byte[Size];
        await inner.ReadAsync(0, expected, TestContext.Current.CancellationToken);
        var actual = await File.ReadAllBytesAsync(backup, TestContext.Current.CancellationToken);
        Assert.Equal(Size, actual.Length);
        Assert.True(actual.AsSpan((int)Marker, 512).ToArray().All(b => b == 0xee));
        expected.AsSpan((int)Marker, 512).Fill(0xee);
        Assert.True(expected.AsSpan().SequenceEqual(actual), "the destination differs from the source outside the marker");
    }

    [Fact]
    public async Task A_bitmap_finer_than_the_destination_blocks_is_rounded_out_to_whole_blocks()
    {
        var inner = new MemoryBlockDevice(Size);
        await inner.WriteAsync(0, Patterns.Generate(0, Size, seed: 3), fua: false, TestContext.Current.CancellationToken);
        var source = new BitmapDevice(inner, Bitmap, 512, 1000);
        var destination = new BitmapDevice(new MemoryBlockDevice(Size), "unused", 65536, 1000);
        await using var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "source" }, source));
            catalog.Add(new Export(new ExportOptions { Name = "backup", BlockSizes = new BlockSizeConstraints(4096, 4096, 65536) }, destination));
        });
        AssertExit(0, await SpindleCli.RunAsync("copy", server.Uri("source"), server.Uri("backup")));

        // 512-byte granules that straddle and fall inside the destination's 4 KiB blocks.
        foreach (var (offset, length) in new (long, int)[] { (4096 - 512, 1024), ((1 << 20) + 1536, 512), ((5 << 20) + 100, 9000) })
        {
            await inner.WriteAsync(offset, Patterns.Generate(offset, length, seed: 4), fua: false, TestContext.Current.CancellationToken);
            source.MarkDirty(offset, length);
        }

        destination.Clear();
        var copy = await SpindleCli.RunAsync("copy", "--json", "--bitmap", Bitmap, server.Uri("source"), server.Uri("backup"));
        AssertExit(0, copy);
        var json = JsonDocument.Parse(copy.StandardOutput).RootElement;
        Assert.Equal(source.DirtyRanges().Sum(range => range.Length), json.GetProperty("dirty_bytes").GetInt64());

        // Whole 4 KiB blocks went to the destination (so it never had to read a block back to patch part of it).
        Assert.Equal(6 * 4096, json.GetProperty("bytes").GetInt64());
        Assert.Empty(destination.Reads);
        Assert.All(destination.Writes, write => Assert.True(write.Offset % 4096 == 0 && write.Length % 4096 == 0, $"write {write.Offset}+{write.Length}"));
        var expected = new byte[Size];
        var actual = new byte[Size];
        await inner.ReadAsync(0, expected, TestContext.Current.CancellationToken);
        await destination.ReadAsync(0, actual, TestContext.Current.CancellationToken);
        Assert.True(expected.AsSpan().SequenceEqual(actual), "the destination differs from the source");
    }

    [Fact]
    public async Task Refusals_name_the_problem_and_leave_the_destination_as_it_was()
    {
        var device = new BitmapDevice(new MemoryBlockDevice(Size), Bitmap, 65536, 1000);
        device.MarkDirty(0, 65536);
        await using var server = await TestServer.StartAsync(device, "disk");
        using var directory = new TempDirectory();
        var uri = server.Uri("disk");

        var missing = await SpindleCli.RunAsync("copy", "--bitmap", "nope", uri, directory.File("missing.img"));
        AssertExit(1, missing);
        Assert.Contains("does not offer qemu:dirty-bitmap:nope", missing.StandardError, StringComparison.Ordinal);
        Assert.Contains("qemu:dirty-bitmap:" + Bitmap, missing.StandardError, StringComparison.Ordinal);

        var absent = await SpindleCli.RunAsync("copy", "--bitmap", Bitmap, uri, directory.File("absent.img"));
        AssertExit(1, absent);
        Assert.Contains("does not exist", absent.StandardError, StringComparison.Ordinal);
        Assert.False(File.Exists(directory.File("absent.img")));

        var small = directory.CreateSparseFile("small.img", Size - 4096);
        var mismatch = await SpindleCli.RunAsync("copy", "--bitmap", Bitmap, uri, small);
        AssertExit(1, mismatch);
        Assert.Contains("the same size", mismatch.StandardError, StringComparison.Ordinal);
        Assert.Equal(Size - 4096, new FileInfo(small).Length);

        // A local image with no bitmap of that name: refused, naming what it has.
        var local = await SpindleCli.RunAsync("copy", "--bitmap", Bitmap, small, directory.CreateSparseFile("other.img", Size - 4096));
        AssertExit(1, local);
        Assert.Contains($"has no bitmap '{Bitmap}' (it has none", local.StandardError, StringComparison.Ordinal);

        AssertExit(2, await SpindleCli.RunAsync("copy", "--bitmap", Bitmap, uri, "null:"));
        AssertExit(2, await SpindleCli.RunAsync("copy", "--bitmap", Bitmap, "--destination-is-zero", uri, small));
        AssertExit(2, await SpindleCli.RunAsync("copy", "--bitmap", "", uri, small));
    }

    /// <summary>
    /// A device that records READs and offers <c>qemu:dirty-bitmap:NAME</c> from a set of dirty granules, answering
    /// each query with at most <paramref name="extentsPerAnswer"/> extents.
    /// </summary>
    private sealed class BitmapDevice(BlockDevice inner, string name, int granularity, int extentsPerAnswer) : BlockDevice
    {
        private readonly Lock _lock = new();
        private readonly SortedSet<long> _dirty = [];
        private readonly List<(long Offset, long Length)> _reads = [];
        private readonly List<(long Offset, long Length)> _writes = [];
        private int _allocationQueries;

        public override long Size => inner.Size;

        public override BlockDeviceFeatures Features => inner.Features;

        /// <summary>base:allocation questions the server passed on (BLOCK_STATUS for that context).</summary>
        public int AllocationQueries => Volatile.Read(ref _allocationQueries);

        public override IReadOnlyList<MetaContextSource> MetaContexts => [new Context(this, name, granularity, extentsPerAnswer)];

        public IReadOnlyList<(long Offset, long Length)> Reads
        {
            get
            {
                lock (_lock)
                {
                    return [.. _reads];
                }
            }
        }

        public IReadOnlyList<(long Offset, long Length)> Writes
        {
            get
            {
                lock (_lock)
                {
                    return [.. _writes];
                }
            }
        }

        public void MarkDirty(long offset, long length)
        {
            lock (_lock)
            {
                for (var granule = offset / granularity; granule <= (offset + length - 1) / granularity; granule++)
                {
                    _dirty.Add(granule);
                }
            }
        }

        public void Clear()
        {
            lock (_lock)
            {
                _reads.Clear();
                _writes.Clear();
                _allocationQueries = 0;
            }
        }

        /// <summary>The dirty granules as merged ranges, clipped to the device.</summary>
        public List<(long Offset, long Length)> DirtyRanges()
        {
            var ranges = new List<(long Offset, long Length)>();
            lock (_lock)
            {
                foreach (var granule in _dirty)
                {
                    var start = granule * granularity;
                    var length = Math.Min(granularity, Size - start);
                    if (ranges.Count > 0 && ranges[^1].Offset + ranges[^1].Length == start)
                    {
                        ranges[^1] = (ranges[^1].Offset, ranges[^1].Length + length);
                    }
                    else
                    {
                        ranges.Add((start, length));
                    }
                }
            }

            return ranges;
        }

        public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
        {
            lock (_lock)
            {
                _reads.Add((offset, destination.Length));
            }

            return inner.ReadAsync(offset, destination, cancellationToken);
        }

        public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
        {
            lock (_lock)
            {
                _writes.Add((offset, source.Length));
            }

            return inner.WriteAsync(offset, source, fua, cancellationToken);
        }

        public override ValueTask FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);

        public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
            inner.TrimAsync(offset, length, fua, cancellationToken);

        public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
            inner.WriteZeroesAsync(offset, length, flags, cancellationToken);

        public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
        {
            Interlocked.Increment(ref _allocationQueries);
            return inner.GetExtentsAsync(offset, length, extents, cancellationToken);
        }

        protected override ValueTask DisposeAsyncCore() => inner.DisposeAsync();

        private bool IsDirty(long granule)
        {
            lock (_lock)
            {
                return _dirty.Contains(granule);
            }
        }

        /// <summary>Runs of equal state at the bitmap's granularity, stopping after a few: the client must ask again.</summary>
        private sealed class Context(BitmapDevice device, string name, int granularity, int extentsPerAnswer) : MetaContextSource
        {
            public override string Name => "qemu:dirty-bitmap:" + name;

            public override ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken)
            {
                var end = offset + length;
                var position = offset;
                var count = 0;
                while (position < end && count < extentsPerAnswer && !status.IsFull)
                {
                    var granule = position / granularity;
                    var dirty = device.IsDirty(granule);
                    var runEnd = (granule + 1) * granularity;
                    while (runEnd < end && device.IsDirty(runEnd / granularity) == dirty)
                    {
                        runEnd += granularity;
                    }

                    runEnd = Math.Min(runEnd, end);
                    status.Add(runEnd - position, dirty ? 1u : 0u);
                    position = runEnd;
                    count++;
                }

                return ValueTask.CompletedTask;
            }
        }
    }
}
