using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// The tools against qemu-nbd serving a sparse qcow2 image: the allocation map must agree with qemu-img map, copies
/// must compare equal with qemu-img compare, and a sparse source must stay sparse at the destination.
/// </summary>
public sealed class QemuNbdTests
{
    private const long Size = 64L << 20;

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    /// <summary>
    /// A 64 MiB qcow2 with data at 0 (1 MiB), 8 MiB (3 MiB) and 40 MiB (64 KiB), zero clusters at 20 MiB (2 MiB) and
    /// nothing anywhere else.
    /// </summary>
    private static async Task<string> CreateSparseQcow2Async(TempDirectory directory, string name = "source.qcow2")
    {
        var path = directory.File(name);
        await PeerTool.RunCheckedAsync("qemu-img", ["create", "-q", "-f", "qcow2", path, "64M"]);
        await PeerTool.RunCheckedAsync("qemu-io", [
            "-f", "qcow2",
            "-c", "write -q -P 0xab 0 1M",
            "-c", "write -q -P 0xcd 8M 3M",
            "-c", "write -q -z 20M 2M",
            "-c", "write -q -P 0x01 40M 64k",
            path,
        ]);
        return path;
    }

    [Fact]
    public async Task Info_map_agrees_with_qemu_img_map()
    {
        using var directory = new TempDirectory();
        var image = await CreateSparseQcow2Async(directory);
        var expected = AllocationMap.FromQemuImg((await PeerTool.RunCheckedAsync("qemu-img", ["map", "--output=json", "-f", "qcow2", image])).StandardOutput);
        await using var qemu = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", image], unix: true);

        var map = await SpindleCli.RunAsync("info", "--map", "--json", qemu.Uri());
        Assert.True(map.ExitCode == 0, map.ToString());
        var actual = AllocationMap.FromSpindle(map.StandardOutput);
        Assert.Equal(expected, actual);

        // The map really has all three kinds of run, so the comparison means something.
        Assert.Contains(actual, run => !run.Hole && !run.Zero);
        Assert.Contains(actual, run => run.Hole && run.Zero);
        Assert.Equal(Size, actual.Sum(run => run.Length));

        // Text output names the runs the way nbdinfo does.
        var text = await SpindleCli.RunAsync("info", "--map", qemu.Uri());
        Assert.True(text.ExitCode == 0, text.ToString());
        Assert.Contains("data", text.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("hole,zero", text.StandardOutput, StringComparison.Ordinal);
        var nbdinfo = await PeerTool.RunCheckedAsync("nbdinfo", ["--map", qemu.Uri()]);
        Assert.Equal(Normalize(nbdinfo.StandardOutput), Normalize(text.StandardOutput));
    }

    [Fact]
    public async Task Info_shows_what_qemu_nbd_offers_including_its_contexts()
    {
        using var directory = new TempDirectory();
        var image = await CreateSparseQcow2Async(directory);
        await using var qemu = await PeerServer.StartQemuNbdAsync(["-A", "-x", "disk", "-D", "sparse test image", "-f", "qcow2", image]);
        var info = await SpindleCli.RunAsync("info", qemu.Uri("disk"));
        Assert.True(info.ExitCode == 0, info.ToString());
        Assert.Contains("export-size: 67108864 (64.0 MiB)", info.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("description: sparse test image", info.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("qemu:allocation-depth", info.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("can_multi_conn: true", info.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("block_size_minimum: 1", info.StandardOutput, StringComparison.Ordinal);

        // Another metadata context, mapped through --context.
        var depth = await SpindleCli.RunAsync("info", "--context", "qemu:allocation-depth", "--map", qemu.Uri("disk"));
        Assert.True(depth.ExitCode == 0, depth.ToString());
        Assert.Contains("local", depth.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("unallocated", depth.StandardOutput, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Copy_from_qcow2_to_a_raw_file_is_exact_and_stays_sparse()
    {
        using var directory = new TempDirectory();
        var image = await CreateSparseQcow2Async(directory);
        await using var qemu = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", image]);
        var destination = directory.File("copy.raw");
        var copy = await SpindleCli.RunAsync("copy", "--json", qemu.Uri(), destination);
        Assert.True(copy.ExitCode == 0, copy.ToString());

        await PeerTool.RunCheckedAsync("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, destination]);

        // Only the data runs were written: 1 MiB + 3 MiB + 64 KiB; holes and zero clusters stayed holes.
        Assert.Contains("\"data_bytes\": 4259840", copy.StandardOutput, StringComparison.Ordinal);
        Assert.Equal(4259840L, await NbdkitTests.AllocatedBytesAsync(destination));
        var sourceMap = AllocationMap.FromQemuImg((await PeerTool.RunCheckedAsync("qemu-img", ["map", "--output=json", "-f", "qcow2", image])).StandardOutput);
        var destinationMap = AllocationMap.FromQemuImg((await PeerTool.RunCheckedAsync("qemu-img", ["map", "--output=json", "-f", "raw", destination])).StandardOutput);
        Assert.Equal(sourceMap.Select(run => (run.Offset, run.Length, run.Hole)), destinationMap.Select(run => (run.Offset, run.Length, run.Hole)));
    }

    [Fact]
    public async Task Copy_into_a_qcow2_served_by_qemu_nbd_is_exact_and_stays_sparse()
    {
        using var directory = new TempDirectory();
        var image = await CreateSparseQcow2Async(directory);
        var target = directory.File("target.qcow2");
        await PeerTool.RunCheckedAsync("qemu-img", ["create", "-q", "-f", "qcow2", target, "64M"]);

        // Dirty the destination first, so the copy must really zero what is a hole in the source.
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "qcow2", "-c", "write -q -P 0x77 16M 8M", "-c", "write -q -P 0x77 30M 1M", target]);
        await using (var source = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", image], unix: true))
        {
            await using var destination = await PeerServer.StartQemuNbdAsync(["-f", "qcow2", "--discard=unmap", target]);
            var copy = await SpindleCli.RunAsync("copy", "--json", source.Uri(), destination.Uri());
            Assert.True(copy.ExitCode == 0, copy.ToString());
            Assert.Contains("\"zeroed_bytes\": 62849024", copy.StandardOutput, StringComparison.Ordinal);
        }

        await PeerTool.RunCheckedAsync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", image, target]);
        var targetMap = AllocationMap.FromQemuImg((await PeerTool.RunCheckedAsync("qemu-img", ["map", "--output=json", "-f", "qcow2", target])).StandardOutput);
        Assert.Equal(4259840L, targetMap.Where(run => !run.Hole).Sum(run => run.Length));
        Assert.All(targetMap.Where(run => run.Hole), run => Assert.True(run.Zero));
    }

    [Fact]
    public async Task Copy_a_file_up_to_qemu_nbd_and_dump_agrees_with_hexdump()
    {
        using var directory = new TempDirectory();
        var target = directory.File("target.qcow2");
        await PeerTool.RunCheckedAsync("qemu-img", ["create", "-q", "-f", "qcow2", target, "8M"]);
        var source = directory.File("source.raw");
        var data = Patterns.Random(8 << 20, seed: 5);
        Array.Clear(data, 1 << 20, 2 << 20);
        await File.WriteAllBytesAsync(source, data, Token);
        await using (var qemu = await PeerServer.StartQemuNbdAsync(["-f", "qcow2", target]))
        {
            var copy = await SpindleCli.RunAsync("copy", source, qemu.Uri());
            Assert.True(copy.ExitCode == 0, copy.ToString());

            var dump = await SpindleCli.RunAsync("dump", "--offset", "1040384", "--length", "16K", qemu.Uri());
            Assert.True(dump.ExitCode == 0, dump.ToString());
            var hexdump = await PeerTool.RunCheckedAsync("hexdump", ["-C", "-s", "1040384", "-n", "16384", source]);
            Assert.Equal(hexdump.StandardOutput, dump.StandardOutput);
        }

        await PeerTool.RunCheckedAsync("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", source, target]);
    }

    /// <summary>Map lines with whitespace collapsed (nbdinfo and spindle pad their columns differently).</summary>
    private static string Normalize(string map) =>
        string.Join('\n', map.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(line => string.Join(' ', line.Split(' ', StringSplitOptions.RemoveEmptyEntries))));
}
