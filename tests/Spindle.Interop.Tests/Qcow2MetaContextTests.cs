using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// BLOCK_STATUS of a served qcow2 image against qemu: base:allocation, <c>qemu:allocation-depth</c> (qemu-nbd -A)
/// and <c>qemu:dirty-bitmap:NAME</c> (qemu-nbd -B NAME) read by nbdinfo, qemu-img map (also through qemu's
/// x-dirty-bitmap option) and spindle info, from Spindle and from qemu-nbd serving the same image side by side.
/// </summary>
public sealed class Qcow2MetaContextTests
{
    private const long Size = 64L << 20;

    [Fact]
    public async Task Allocation_and_allocation_depth_of_a_backing_chain_match_qemu_nbd_and_qemu_img()
    {
        using var directory = new TempDirectory();
        var basePath = await Qcow2Peers.Create(directory, "base.qcow2", "cluster_size=65536", Size);
        await Qcow2Peers.Io(basePath, "qcow2", "write -P 1 0 4M", "write -P 2 16M 1M", "write -z 20M 1M");
        var top = await Qcow2Peers.Create(directory, "top.qcow2", "cluster_size=65536,extended_l2=on", Size, "-b", "base.qcow2", "-F", "qcow2");
        await Qcow2Peers.Io(top, "qcow2", "write -P 3 1M 8k", "write -z 2M 64k", "discard 3M 128k", "write -P 4 30M 1M", "write -P 5 40M 4k", "write -z -u 48M 2M");
        await Qcow2Peers.Img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536", basePath, directory.File("compressed.qcow2"));

        foreach (var image in new[] { top, directory.File("compressed.qcow2") })
        {
            await using var qemu = await PeerServer.StartQemuNbdAsync(["-r", "-A", "-f", "qcow2", image]);
            await using var spindle = await Qcow2Peers.Serve("-r", image);
            foreach (var context in new[] { "base:allocation", "qemu:allocation-depth" })
            {
                var ours = await Qcow2Peers.Output("nbdinfo", "--map=" + context, spindle.Uri!);
                Assert.Equal(await Qcow2Peers.Output("nbdinfo", "--map=" + context, qemu.Uri()), ours);
                Assert.Equal(Runs(ours), Runs(await SpindleInfoMap(context, spindle.Uri!)));
            }

            Assert.Equal(await Qcow2Peers.Output("qemu-img", "map", "--output=json", "-f", "raw", qemu.Uri()), await Qcow2Peers.Output("qemu-img", "map", "--output=json", "-f", "raw", spindle.Uri!));

            // And what qemu itself says opening the file: the same data and zero runs.
            Assert.Equal(await Qcow2Peers.Map(image, "qcow2"), await Qcow2Peers.Map(spindle.Uri!, "raw"));
            if (image == top)
            {
                Assert.Contains("backing depth 2", await Qcow2Peers.Output("nbdinfo", "--map=qemu:allocation-depth", spindle.Uri!), StringComparison.Ordinal);
            }
        }
    }

    [Fact]
    public async Task Dirty_bitmaps_read_as_qemu_nbd_B_serves_them_through_nbdinfo_x_dirty_bitmap_and_spindle_info()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await Qcow2Peers.Io(image, "qcow2", "write -P 1 0 8M");
        await Qcow2Peers.Img("bitmap", "--add", image, "coarse");
        await Qcow2Peers.Img("bitmap", "--add", "-g", "4096", image, "fine");
        await Qcow2Peers.Io(image, "qcow2", "write -P 2 1M 8k", "write -z 5M 64k");
        await Qcow2Peers.Img("bitmap", "--add", image, "frozen");
        await Qcow2Peers.Io(image, "qcow2", "write -P 3 9M 4k");
        await Qcow2Peers.Img("bitmap", "--disable", image, "frozen");

        // Writes served by Spindle mark the enabled bitmaps (not the disabled one); they are stored when it stops.
        await using (var spindle = await Qcow2Peers.Serve(image))
        {
            await Qcow2Peers.Io(spindle.Uri!, "raw", "write -P 4 20M 4k", "write -z 24M 128k", "discard 2M 64k", "write -P 5 63M 1M");
            Assert.Equal(0, await spindle.StopAsync());
        }

        await Qcow2Peers.AssertClean(image, allowLeaks: false);
        string[] bitmaps = ["coarse", "fine", "frozen"];
        await using (var qemu = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", "-B", "coarse", "-B", "fine", "-B", "frozen", image]))
        await using (var spindle = await Qcow2Peers.Serve("-r", image))
        {
            foreach (var bitmap in bitmaps)
            {
                var context = "qemu:dirty-bitmap:" + bitmap;
                var ours = await Qcow2Peers.Output("nbdinfo", "--map=" + context, spindle.Uri!);
                Assert.Equal(await Qcow2Peers.Output("nbdinfo", "--map=" + context, qemu.Uri()), ours);
                Assert.Contains("dirty", ours, StringComparison.Ordinal);
                Assert.Equal(Runs(ours), Runs(await SpindleInfoMap(context, spindle.Uri!)));

                // qemu's own client reads a bitmap through x-dirty-bitmap (dirty areas show as "data": false).
                Assert.Equal(await XDirtyBitmap(qemu.Port!.Value, context), await XDirtyBitmap(PortOf(spindle.Uri!), context));
            }

            // The disabled bitmap did not see what Spindle wrote; the enabled ones did.
            Assert.Contains(Runs(await Qcow2Peers.Output("nbdinfo", "--map=qemu:dirty-bitmap:fine", spindle.Uri!)), r => r.Offset == 20L << 20 && r.Flags == 1);
            Assert.DoesNotContain(Runs(await Qcow2Peers.Output("nbdinfo", "--map=qemu:dirty-bitmap:frozen", spindle.Uri!)), r => r.Offset <= 20L << 20 && r.Offset + r.Length > 20L << 20 && r.Flags == 1);
        }
    }

    private static async Task<string> SpindleInfoMap(string context, string uri)
    {
        var result = await SpindleProcess.RunAsync("info", "--map", "--context", context, uri);
        Assert.True(result.ExitCode == 0, result.ToString());
        return result.StandardOutput;
    }

    private static Task<string> XDirtyBitmap(int port, string context) => Qcow2Peers.Output(
        "qemu-img", "map", "--output=json", "--image-opts",
        $"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port.ToString(CultureInfo.InvariantCulture)},x-dirty-bitmap={context}");

    private static int PortOf(string uri) => new Uri(uri).Port;

    /// <summary>(offset, length, flags) of each line of nbdinfo --map or spindle info --map.</summary>
    private static List<(long Offset, long Length, uint Flags)> Runs(string map) =>
        map.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Where(words => words.Length >= 3 && long.TryParse(words[0], out _))
            .Select(words => (long.Parse(words[0], CultureInfo.InvariantCulture), long.Parse(words[1], CultureInfo.InvariantCulture), uint.Parse(words[2], CultureInfo.InvariantCulture)))
            .ToList();
}
