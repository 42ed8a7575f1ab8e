using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// Every kind of image qemu-img makes, served by <c>spindle serve</c> and read over NBD by qemu-img compare against
/// qemu's own reading of the file (issue 13: "images made by qemu-img ... are served by Spindle and compared with
/// qemu-img compare"); then a write through Spindle into a partly written cluster, read back by qemu from the file.
/// The backend tests (Spindle.Qcow2.Tests) read the same layouts through the device directly; this is the served path.
/// </summary>
public sealed class Qcow2LayoutTests
{
    private const long Size = 16L << 20;

    /// <summary>Data, unaligned to clusters, zeroes, a discard and a last cluster: what every layout holds.</summary>
    private static readonly string[] Fill =
    [
        "write -P 0x11 0 64k", "write -P 0x22 1000k 300k", "write -z 2M 1M", "write -P 0x33 5M 2M", "discard 5632k 512k", "write -P 0x44 15M 1M",
    ];

    /// <summary>How the image is made: qemu-img create options (v2, v3, cluster size classes, subclusters, refcount widths), or "compressed:TYPE" for qemu-img convert -c, or "backing" for a chain.</summary>
    public static TheoryData<string> Layouts => new()
    {
        "compat=0.10,cluster_size=65536",
        "compat=0.10,cluster_size=512",
        "compat=1.1,cluster_size=512",
        "compat=1.1,cluster_size=4096",
        "compat=1.1,cluster_size=2097152",
        "compat=1.1,cluster_size=65536,extended_l2=on",
        "compat=1.1,cluster_size=65536,refcount_bits=1",
        "compat=1.1,cluster_size=65536,refcount_bits=64,lazy_refcounts=on",
        "compressed:zlib",
        "compressed:zstd",
        "backing",
    };

    [Theory]
    [MemberData(nameof(Layouts))]
    public async Task Image_made_by_qemu_img_is_served_as_qemu_reads_it_and_takes_writes(string layout)
    {
        using var directory = new TempDirectory();
        var image = await Make(directory, layout);

        await using (var spindle = await Qcow2Peers.Serve(image))
        {
            Assert.True(await Qcow2Peers.Same(spindle.Uri!, "raw", image, "qcow2"), $"{layout}: what Spindle serves differs from what qemu reads");

            // 8 KiB inside the 0x22 run: a partial cluster (a compressed one, or one in the backing file, is copied on write).
            await Qcow2Peers.Io(spindle.Uri!, "raw", "write -P 0x66 1200k 8k");
            Assert.Equal(0, await spindle.StopAsync());
        }

        await Qcow2Peers.Read(image, "qcow2", "read -P 0x22 1000k 200k", "read -P 0x66 1200k 8k", "read -P 0x22 1208k 92k", "read -P 0x11 0 64k", "read -P 0x44 15M 1M");
        await Qcow2Peers.AssertClean(image, allowLeaks: false);
    }

    private static async Task<string> Make(TempDirectory directory, string layout)
    {
        if (layout.StartsWith("compressed:", StringComparison.Ordinal))
        {
            var raw = directory.File("source.raw");
            await Qcow2Peers.Img("create", "-q", "-f", "raw", raw, Size.ToString(CultureInfo.InvariantCulture));
            await Qcow2Peers.Io(raw, "raw", Fill);
            var compressed = directory.File("compressed.qcow2");
            await Qcow2Peers.Img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=" + layout["compressed:".Length..], raw, compressed);
            Assert.Contains("compression type: " + layout["compressed:".Length..], await Qcow2Peers.Output("qemu-img", "info", compressed), StringComparison.Ordinal);
            return compressed;
        }

        if (layout == "backing")
        {
            // base.raw <- mid.qcow2 (v2) <- top.qcow2 (v3, subclusters): the fill is spread over the three.
            var raw = directory.File("base.raw");
            await Qcow2Peers.Img("create", "-q", "-f", "raw", raw, Size.ToString(CultureInfo.InvariantCulture));
            await Qcow2Peers.Io(raw, "raw", Fill[..2]);
            var mid = await Qcow2Peers.Create(directory, "mid.qcow2", "compat=0.10,cluster_size=65536", Size, "-b", "base.raw", "-F", "raw");
            await Qcow2Peers.Io(mid, "qcow2", Fill[2..4]);
            var top = await Qcow2Peers.Create(directory, "top.qcow2", "cluster_size=65536,extended_l2=on", Size, "-b", "mid.qcow2", "-F", "qcow2");
            await Qcow2Peers.Io(top, "qcow2", Fill[4..]);
            return top;
        }

        var path = await Qcow2Peers.Create(directory, "image.qcow2", layout, Size);
        await Qcow2Peers.Io(path, "qcow2", Fill);
        return path;
    }
}
