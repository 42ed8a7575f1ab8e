using System.Text.Json;
using Spindle.Storage;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>Persistent dirty bitmaps made by qemu-img bitmap: updated by writes, stored, and read as qemu-nbd -B reads them.</summary>
public sealed class BitmapTests
{
    private const long Size = 32L << 20;

    [Theory]
    [InlineData("compat=1.1,cluster_size=65536", 65536)]
    [InlineData("compat=1.1,cluster_size=4096", 512)]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on", 1048576)]
    public async Task Writes_mark_the_enabled_bitmap_which_qemu_then_reads(string options, int granularity)
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "bitmap.qcow2", options, Size);
        await Qemu.Io(image, "qcow2", "write -P 0x01 0 1M");
        await Qemu.Img("bitmap", "--add", "-g", granularity.ToString(System.Globalization.CultureInfo.InvariantCulture), image, "tracked");
        await Qemu.Img("bitmap", "--add", "--disable", image, "frozen");

        var expected = new bool[Size / granularity];
        await using (var device = Qcow2Image.Open(image))
        {
            Assert.Equal(["tracked", "frozen"], device.Bitmaps.Select(b => b.Name));
            Assert.Contains(device.MetaContexts, c => c.Name == "qemu:dirty-bitmap:tracked");

            // While open for writing the bitmaps are in use, as qemu marks them.
            Assert.All(await BitmapFlags(image), b => Assert.Contains("in-use", b.Flags));
            var random = new Random(granularity);
            for (var i = 0; i < 40; i++)
            {
                var offset = (long)(random.NextDouble() * (Size - 300_000));
                var length = random.Next(1, 300_000);
                switch (i % 4)
                {
                    case 0 or 1:
                        await device.WriteAsync(offset, new byte[length], fua: false, CancellationToken.None);
                        break;
                    case 2:
                        await device.WriteZeroesAsync(offset, length, ZeroFlags.None, CancellationToken.None);
                        break;
                    default:
                        await device.TrimAsync(offset, length, fua: false, CancellationToken.None);
                        break;
                }

                for (var bit = offset / granularity; bit <= (offset + length - 1) / granularity; bit++)
                {
                    expected[bit] = true;
                }

                if (i == 20)
                {
                    await device.FlushAsync(CancellationToken.None);
                }
            }
        }

        // Closed cleanly: stored, not in use, and qemu-img check is clean.
        var flags = await BitmapFlags(image);
        Assert.Equal(["auto"], flags.Single(b => b.Name == "tracked").Flags);
        Assert.Empty(flags.Single(b => b.Name == "frozen").Flags);
        await Qemu.AssertConsistent(image, allowLeaks: false);

        var expectedExtents = new List<(long, long, uint)>();
        for (var bit = 0; bit < expected.Length; bit++)
        {
            expectedExtents.Add((bit * (long)granularity, granularity, expected[bit] ? 1u : 0u));
        }

        // qemu-nbd -B exposes the bitmap as qemu:dirty-bitmap:NAME: the oracle for what was stored.
        await using var server = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", "-B", "tracked", "-B", "frozen", image], unix: true);
        var qemuTracked = BackingTests.Normalize(await BackingTests.NbdMap(server.Uri(), "qemu:dirty-bitmap:tracked"));
        Assert.Equal(BackingTests.Normalize(expectedExtents), qemuTracked);
        Assert.Equal([(0L, Size, 0u)], BackingTests.Normalize(await BackingTests.NbdMap(server.Uri(), "qemu:dirty-bitmap:frozen")));

        await using var reopened = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        var context = reopened.MetaContexts.Single(c => c.Name == "qemu:dirty-bitmap:tracked");
        Assert.Equal(qemuTracked, BackingTests.Normalize(await ReadTests.Extents(reopened, context)));
    }

    [Fact]
    public async Task A_bitmap_left_in_use_by_a_crash_is_inconsistent_as_qemu_says()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "crashed.qcow2", "compat=1.1", Size);
        await Qemu.Img("bitmap", "--add", image, "b");
        var process = PeerTool.Start(CrashTests.DotnetHost(), [CrashTests.WriterPath(), image, "1", "64", "65536"]);
        try
        {
            for (var i = 0; i < 600 && !(await BitmapFlags(image)).Single().Flags.Contains("in-use"); i++)
            {
                await Task.Delay(50);
            }
        }
        finally
        {
            process.Kill();
            await process.WaitForExitAsync();
        }

        Assert.Contains("in-use", (await BitmapFlags(image)).Single().Flags);
        await using (var device = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            var info = device.Bitmaps.Single();
            Assert.True(info.InUse);
            Assert.False(info.Usable);
            Assert.DoesNotContain(device.MetaContexts, c => c.Name.StartsWith("qemu:dirty-bitmap:", StringComparison.Ordinal));
            Assert.Contains(device.Warnings, w => w.Contains("'b' is inconsistent", StringComparison.Ordinal));
        }

        // qemu agrees: it refuses to export an inconsistent bitmap.
        var result = await PeerTool.RunAsync("qemu-nbd", ["-r", "-f", "qcow2", "-B", "b", "-k", directory.File("s.sock"), image], TimeSpan.FromSeconds(20));
        Assert.NotEqual(0, result.ExitCode);
        Assert.Contains("inconsistent", result.StandardError, StringComparison.OrdinalIgnoreCase);

        // Opening for writing keeps it in use (still inconsistent) and never exposes it.
        await using (var device = Qcow2Image.Open(image))
        {
            await device.WriteAsync(0, new byte[4096], fua: true, CancellationToken.None);
        }

        Assert.Contains("in-use", (await BitmapFlags(image)).Single().Flags);
    }

    private static async Task<List<(string Name, List<string> Flags)>> BitmapFlags(string image)
    {
        using var info = await Qemu.Info(image, "-U");
        var list = new List<(string, List<string>)>();
        if (info.RootElement.GetProperty("format-specific").GetProperty("data").TryGetProperty("bitmaps", out var bitmaps))
        {
            foreach (var bitmap in bitmaps.EnumerateArray())
            {
                list.Add((bitmap.GetProperty("name").GetString()!, bitmap.GetProperty("flags").EnumerateArray().Select(f => f.GetString()!).ToList()));
            }
        }

        return list;
    }
}
