using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// Extended headers over a qcow2 export: an 8 TiB sparse image served by <c>spindle serve</c>, read by libnbd 1.22 and
/// qemu 10 from the Debian 13 root (scripts/trixie-root.sh), whose BLOCK_STATUS extents are longer than 4 GiB.
/// </summary>
public sealed class Qcow2ExtendedHeaderTests
{
    private const long GiB = 1L << 30;
    private const long Size = 8L << 40;

    [Fact]
    public async Task A_large_sparse_qcow2_answers_64_bit_block_status_to_libnbd_and_qemu_10()
    {
        using var scratch = Trixie.CreateScratch();
        var image = scratch.HostPath("big.qcow2");
        await Qcow2Peers.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, Size.ToString(CultureInfo.InvariantCulture));
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x5a 5G 64k", "write -z 6G 1G", "write -P 0x6b 7G 128k", "write -P 0x7c 6T 64k");
        await using var spindle = await Qcow2Peers.Serve(image);

        var script = $$"""
            import nbd
            h.set_request_extended_headers(True)
            h.add_meta_context("base:allocation")
            h.add_meta_context("qemu:allocation-depth")
            h.connect_uri("{{spindle.Uri}}")
            print("extended", h.get_extended_headers_negotiated())
            print("size", h.get_size())
            runs = {}
            def extents(ctx, offset, entries, err):
                runs.setdefault(ctx, []).extend(entries)
                return 0
            h.block_status_64(8 * 2**40 - 4 * 2**30, 4 * 2**30, extents)
            for ctx in sorted(runs):
                print(ctx, ";".join("%d/%d" % e for e in runs[ctx]))
            print("read", h.pread(65536, 6 * 2**40) == b"\x7c" * 65536)
            h.pwrite(b"\x8d" * 4096, 5 * 2**40, nbd.CMD_FLAG_FUA)
            h.shutdown()
            """;
        var result = await Trixie.RunCheckedAsync("nbdsh", ["-c", script], TimeSpan.FromSeconds(120));
        var lines = result.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Contains("extended True", lines);
        Assert.Contains($"size {Size}", lines);
        Assert.Contains("read True", lines);

        // One BLOCK_STATUS from 4 GiB to the end: a 1 GiB hole, 64 KiB of data, the hole and zero clusters to 7 GiB,
        // 128 KiB of data, then the hole to 6 TiB in one extent of almost 6 TiB, which only a 64-bit extent can carry.
        var allocation = Assert.Single(lines, l => l.StartsWith("base:allocation ", StringComparison.Ordinal))["base:allocation ".Length..].Split(';');
        Assert.Equal(["1073741824/3", "65536/0", "2147418112/3", "131072/0", $"{(6L << 40) - (7 * GiB) - (128 << 10)}/3", "65536/0"], allocation[..6]);
        var depth = Assert.Single(lines, l => l.StartsWith("qemu:allocation-depth ", StringComparison.Ordinal))["qemu:allocation-depth ".Length..].Split(';');
        Assert.Contains(depth, d => long.Parse(d.Split('/')[0], CultureInfo.InvariantCulture) > 4 * GiB);

        // qemu 10's client maps the export as qemu 7.2 maps the file, with extended headers negotiated.
        var map = await Trixie.RunCheckedAsync("qemu-img", ["map", "--output=json", "-f", "raw", spindle.Uri!], TimeSpan.FromSeconds(120));
        var mapFile = scratch.HostPath("map.json");
        await File.WriteAllTextAsync(mapFile, map.StandardOutput);
        Assert.Contains("\"start\": 5497558138880, \"length\": 65536", map.StandardOutput, StringComparison.Ordinal);
        Assert.Contains(spindle.Output, line => line.Contains("extended headers True", StringComparison.Ordinal));
        Assert.Equal(0, await spindle.StopAsync());
        await Qcow2Peers.AssertClean(image, allowLeaks: false);
        await Qcow2Peers.Io(image, "qcow2", "read -P 0x8d 5T 4k", "read -P 0x7c 6T 64k");
    }
}
