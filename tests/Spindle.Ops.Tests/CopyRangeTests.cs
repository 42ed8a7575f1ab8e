using Spindle.Cli.Commands;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>
/// The pieces of <c>spindle copy --bitmap</c> below the command line (this project sees Spindle.Cli's internals):
/// <see cref="DirtyRangeSet"/> and <see cref="CopyEngine"/> copying only <see cref="CopySettings.Ranges"/> between
/// memory devices. The command against real servers: CopyBitmapTests (Spindle.Client.Tests) and
/// CopyBitmapInteropTests (Spindle.Interop.Tests).
/// </summary>
public sealed class CopyRangeTests
{
    private const int Size = 4 << 20;

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    [Fact]
    public void Dirty_ranges_merge_where_they_touch_and_must_come_in_order()
    {
        var set = new DirtyRangeSet();
        set.Add(0, 4096);
        set.Add(4096, 4096);
        set.Add(65536, 512);
        set.Add(70000, 0);
        Assert.Equal([new ByteRange(0, 8192), new ByteRange(65536, 512)], set.Ranges);
        Assert.Equal(8704, set.DirtyBytes);
        Assert.Throws<ArgumentException>(() => set.Add(65536, 1));
    }

    [Fact]
    public void A_fragmented_bitmap_is_coarsened_to_a_bounded_number_of_ranges_that_still_cover_every_dirty_byte()
    {
        // Every other 512-byte block dirty over 64 MiB: 65536 ranges, far more than the limit of 1000.
        var set = new DirtyRangeSet(maxRanges: 1000);
        var added = new List<ByteRange>();
        for (long offset = 0; offset < 64L << 20; offset += 1024)
        {
            set.Add(offset, 512);
            added.Add(new ByteRange(offset, 512));
            Assert.True(set.Ranges.Count < 1000);
        }

        Assert.Equal(added.Sum(range => range.Length), set.DirtyBytes);
        Assert.True(set.MergeGap >= 512);
        for (var i = 1; i < set.Ranges.Count; i++)
        {
            Assert.True(set.Ranges[i].Offset > set.Ranges[i - 1].End + set.MergeGap, "ranges in order, every gap wider than the merge gap");
        }

        var index = 0;
        foreach (var range in added)
        {
            while (set.Ranges[index].End < range.End)
            {
                index++;
            }

            Assert.True(set.Ranges[index].Offset <= range.Offset, $"{range} not covered");
        }
    }

    [Fact]
    public async Task Only_the_ranges_are_copied_and_zeroes_inside_them_are_written_as_zeroes_not_read()
    {
        await using var source = new MemoryBlockDevice(Size);
        await using var destination = new MemoryBlockDevice(Size);
        await source.WriteAsync(0, Patterns.Generate(0, Size, seed: 1), fua: false, Token);
        await destination.WriteAsync(0, Patterns.Generate(0, Size, seed: 2), fua: false, Token);
        await source.WriteZeroesAsync(2 << 20, 1 << 20, ZeroFlags.None, Token);

        // Unaligned, one range touching the next, one reaching past the end (clipped), a zero range inside one.
        ByteRange[] ranges = [new(1000, 5000), new(6000, 3000), new(1 << 20, 65536), new((2 << 20) - 4096, (1 << 20) + 8192), new(Size - 512, 4096)];
        var engine = new CopyEngine(source, destination, new CopySettings { Ranges = ranges });
        var result = await engine.RunAsync(Token);

        Assert.Equal(8000 + 65536 + (1 << 20) + 8192 + 512, result.Size);
        Assert.Equal(1 << 20, result.ZeroedBytes);
        Assert.Equal(result.Size - (1 << 20), result.DataBytes);

        var expected = Patterns.Generate(0, Size, seed: 2);
        var copied = Patterns.Generate(0, Size, seed: 1);
        Array.Clear(copied, 2 << 20, 1 << 20);
        foreach (var range in ranges)
        {
            var end = Math.Min(range.End, Size);
            Array.Copy(copied, range.Offset, expected, range.Offset, end - range.Offset);
        }

        var actual = new byte[Size];
        await destination.ReadAsync(0, actual, Token);
        Assert.True(expected.AsSpan().SequenceEqual(actual), "the destination differs outside or inside the ranges");
    }
}
