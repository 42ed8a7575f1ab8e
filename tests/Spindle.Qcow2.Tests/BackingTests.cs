using System.Globalization;
using Spindle.Storage;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>
/// A chain top.qcow2 -> mid.qcow2 -> base.raw (each shorter than the one above), compared with what qemu reads and
/// what qemu-nbd reports for base:allocation and qemu:allocation-depth (nbdinfo --map).
/// </summary>
public sealed class BackingTests
{
    private const long TopSize = 24L << 20;
    private const long MidSize = 20L << 20;
    private const long BaseSize = (12L << 20) + 4096;

    private static async Task<string> CreateChain(TempDirectory directory, string topOptions = "compat=1.1,cluster_size=65536")
    {
        var basePath = directory.File("base.raw");
        await Qemu.Img("create", "-q", "-f", "raw", basePath, BaseSize.ToString(CultureInfo.InvariantCulture));
        await Qemu.Io(basePath, "raw", "write -P 0xb1 0 3M", "write -P 0xb2 6M 100k", $"write -P 0xb3 {BaseSize - 4096} 4096");

        var mid = directory.File("mid.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=4096", "-b", "base.raw", "-F", "raw", mid, MidSize.ToString(CultureInfo.InvariantCulture));
        await Qemu.Io(mid, "qcow2", "write -P 0xa1 1M 1M", "write -z 2M 64k", "write -P 0xa2 7M 8k", "write -P 0xa3 15M 1M");

        var top = directory.File("top.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-o", topOptions, "-b", "mid.qcow2", "-F", "qcow2", top, TopSize.ToString(CultureInfo.InvariantCulture));
        await Qemu.Io(top, "qcow2", "write -P 0xc1 1536k 64k", "write -z 6M 64k", "write -P 0xc2 22M 1M", "write -P 0xc3 100000 5000");
        return top;
    }

    [Theory]
    [InlineData("compat=1.1,cluster_size=65536")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    [InlineData("compat=0.10,cluster_size=65536")]
    public async Task Chain_reads_as_qemu_reads_it(string topOptions)
    {
        using var directory = new TempDirectory();
        var top = await CreateChain(directory, topOptions);
        await using (var device = Qcow2Image.Open(top, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Assert.Equal(2, device.BackingChain.Count);
            await Qemu.DumpToRaw(device, directory.File("dump.raw"));
        }

        Assert.True(await Qemu.Same(directory.File("dump.raw"), "raw", top, "qcow2"));
    }

    /// <summary>
    /// The connection thread's read path through the chain (a persistent overlay reads its base this way): once the
    /// tables and data are cached, reads of every layer are served at once, and always as the slow path reads them.
    /// </summary>
    [Theory]
    [InlineData("compat=1.1,cluster_size=65536")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    public async Task Immediate_reads_through_the_chain_agree_with_the_slow_path(string topOptions)
    {
        using var directory = new TempDirectory();
        var top = await CreateChain(directory, topOptions);
        await using var device = Qcow2Image.Open(top, new Qcow2OpenOptions { ReadOnly = true });
        var expected = new byte[TopSize];
        await device.ReadAsync(0, expected, CancellationToken.None); // loads every table, caches every file

        // Base only (below both qcow2 layers), mid only, top, zeroes, past the base's end: all at once now.
        foreach (var offset in new long[] { 200_000, (1L << 20) + 4096, 1536L << 10, 6L << 20, 13L << 20 })
        {
            var buffer = new byte[8192];
            Assert.True(device.TryReadImmediate(offset, buffer), $"offset {offset}");
            Assert.Equal(expected.AsSpan((int)offset, buffer.Length).ToArray(), buffer);
        }

        var random = new Random(77);
        for (var i = 0; i < 300; i++)
        {
            var length = random.Next(1, 300_000);
            var offset = random.NextInt64(TopSize - length);
            var buffer = new byte[length];
            if (device.TryReadImmediate(offset, buffer))
            {
                Assert.Equal(expected.AsSpan((int)offset, length).ToArray(), buffer);
            }
        }
    }

    [Theory]
    [InlineData("compat=1.1,cluster_size=65536")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    public async Task Block_status_and_allocation_depth_match_qemu_nbd(string topOptions)
    {
        using var directory = new TempDirectory();
        var top = await CreateChain(directory, topOptions);
        await using var server = await PeerServer.StartQemuNbdAsync(["-r", "-A", "-f", "qcow2", top], unix: true);
        var qemuAllocation = await NbdMap(server.Uri(), "base:allocation");
        var qemuDepth = await NbdMap(server.Uri(), "qemu:allocation-depth");

        await using var device = Qcow2Image.Open(top, new Qcow2OpenOptions { ReadOnly = true });
        var ours = new List<(long, long, uint)>();
        var extents = new ExtentList(1 << 16);
        for (long offset = 0; offset < device.Size;)
        {
            extents.Clear(1 << 16);
            await device.GetExtentsAsync(offset, device.Size - offset, extents, CancellationToken.None);
            foreach (var extent in extents.Items)
            {
                ours.Add((offset, extent.Length, extent.Status));
                offset += extent.Length;
            }
        }

        Assert.Equal(Normalize(qemuAllocation), Normalize(ours));

        var depth = device.MetaContexts.Single(c => c.Name == "qemu:allocation-depth");
        var oursDepth = new List<(long, long, uint)>();
        for (long offset = 0; offset < device.Size;)
        {
            extents.Clear(1 << 16);
            await depth.GetStatusAsync(offset, device.Size - offset, extents, CancellationToken.None);
            foreach (var extent in extents.Items)
            {
                oursDepth.Add((offset, extent.Length, extent.Status));
                offset += extent.Length;
            }
        }

        Assert.Equal(Normalize(qemuDepth), Normalize(oursDepth));
    }

    [Theory]
    [InlineData("compat=1.1,cluster_size=65536")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    [InlineData("compat=0.10,cluster_size=4096")]
    public async Task Writes_into_the_top_copy_on_write_from_the_chain(string topOptions)
    {
        using var directory = new TempDirectory();
        var top = await CreateChain(directory, topOptions);
        var model = directory.File("model.raw");
        await Qemu.Img("convert", "-q", "-f", "qcow2", "-O", "raw", top, model);
        var random = new Random(5);
        await using (var modelFile = new FileStream(model, FileMode.Open, FileAccess.ReadWrite))
        await using (var device = Qcow2Image.Open(top))
        {
            for (var i = 0; i < 200; i++)
            {
                var offset = (long)(random.NextDouble() * (TopSize - 70_000));
                var data = Patterns.Random(random.Next(1, 70_000), i);
                await device.WriteAsync(offset, data, fua: false, CancellationToken.None);
                modelFile.Position = offset;
                await modelFile.WriteAsync(data);
                if (i % 40 == 0)
                {
                    // Whole clusters zeroed over the backing file become zero clusters (zeroes are written in v2).
                    var zeroAt = (long)random.Next((int)(TopSize / 65536) - 1) * 65536;
                    await device.WriteZeroesAsync(zeroAt, 65536, ZeroFlags.None, CancellationToken.None);
                    modelFile.Position = zeroAt;
                    await modelFile.WriteAsync(new byte[65536]);
                }
            }
        }

        await Qemu.AssertConsistent(top, allowLeaks: false);
        await Qemu.AssertConsistent(directory.File("mid.qcow2"), allowLeaks: false);
        Assert.True(await Qemu.Same(model, "raw", top, "qcow2"));
        Assert.True(await Qemu.Same(directory.File("mid.qcow2"), "qcow2", directory.File("mid.qcow2"), "qcow2"));
    }

    [Fact]
    public async Task A_backing_chain_that_loops_is_refused()
    {
        using var directory = new TempDirectory();
        var a = directory.File("a.qcow2");
        var b = directory.File("b.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", a, "1M");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b, "1M");
        // Point a at b with qemu-img rebase -u (unsafe: no check), closing the loop.
        await Qemu.Img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a);
        var error = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(b, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Contains("loops", error.Message, StringComparison.Ordinal);

        var missing = directory.File("c.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", missing, "1M");
        Assert.Throws<FileNotFoundException>(() => Qcow2Image.Open(missing, new Qcow2OpenOptions { ReadOnly = true }));
    }

    /// <summary>nbdinfo --map=CONTEXT: (offset, length, status) per line.</summary>
    internal static async Task<List<(long, long, uint)>> NbdMap(string uri, string context)
    {
        var result = await PeerTool.RunCheckedAsync("nbdinfo", [$"--map={context}", uri]);
        var list = new List<(long, long, uint)>();
        foreach (var line in result.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            list.Add((long.Parse(parts[0], CultureInfo.InvariantCulture), long.Parse(parts[1], CultureInfo.InvariantCulture), uint.Parse(parts[2], CultureInfo.InvariantCulture)));
        }

        return list;
    }

    /// <summary>Merges neighbours with the same status, so that only the described content is compared.</summary>
    internal static List<(long Offset, long Length, uint Status)> Normalize(List<(long Offset, long Length, uint Status)> extents)
    {
        var merged = new List<(long Offset, long Length, uint Status)>();
        foreach (var extent in extents)
        {
            if (merged.Count > 0 && merged[^1].Status == extent.Status && merged[^1].Offset + merged[^1].Length == extent.Offset)
            {
                merged[^1] = (merged[^1].Offset, merged[^1].Length + extent.Length, extent.Status);
            }
            else
            {
                merged.Add(extent);
            }
        }

        return merged;
    }
}
