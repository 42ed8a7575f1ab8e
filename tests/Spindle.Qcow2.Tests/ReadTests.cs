using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>Images qemu made and filled, read entirely through the backend and compared with qemu's own reading.</summary>
public sealed class ReadTests
{
    public static TheoryData<string, long> Layouts => new()
    {
        { "compat=0.10,cluster_size=65536", 64L << 20 },
        { "compat=0.10,cluster_size=512", 8L << 20 },
        { "compat=1.1,cluster_size=512", 8L << 20 },
        { "compat=1.1,cluster_size=4096", 32L << 20 },
        { "compat=1.1,cluster_size=65536", 64L << 20 },
        { "compat=1.1,cluster_size=2097152", 64L << 20 },
        { "compat=1.1,cluster_size=65536,extended_l2=on", 64L << 20 },
        { "compat=1.1,cluster_size=16384,extended_l2=on", 16L << 20 },
        { "compat=1.1,cluster_size=65536,refcount_bits=1", 32L << 20 },
        { "compat=1.1,cluster_size=4096,refcount_bits=64", 16L << 20 },
        { "compat=1.1,cluster_size=65536,lazy_refcounts=on", 32L << 20 },
        { "compat=1.1,cluster_size=65536,preallocation=metadata", 16L << 20 },
    };

    [Theory]
    [MemberData(nameof(Layouts))]
    public async Task Image_filled_by_qemu_io_reads_as_qemu_reads_it(string options, long size)
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "image.qcow2", options, size);
        await Qemu.Io(image, "qcow2", FillCommands(size));

        await using (var device = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Assert.Equal(size, device.Size);
            await Qemu.DumpToRaw(device, directory.File("dump.raw"));
        }

        Assert.True(await Qemu.Same(directory.File("dump.raw"), "raw", image, "qcow2"), $"{options}: the backend read differs from qemu's");
    }

    [Theory]
    [InlineData("compat=0.10,cluster_size=65536")]
    [InlineData("compat=1.1,cluster_size=4096")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    public async Task Block_status_and_allocation_depth_match_qemu_nbd(string options)
    {
        using var directory = new TempDirectory();
        const long Size = 16L << 20;
        var image = await Qemu.Create(directory, "map.qcow2", options, Size);
        await Qemu.Io(image, "qcow2", FillCommands(Size));
        await using var server = await PeerServer.StartQemuNbdAsync(["-r", "-A", "-f", "qcow2", image], unix: true);
        await using var device = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        Assert.Equal(
            BackingTests.Normalize(await BackingTests.NbdMap(server.Uri(), "base:allocation")),
            BackingTests.Normalize(await Extents(device, null)));
        Assert.Equal(
            BackingTests.Normalize(await BackingTests.NbdMap(server.Uri(), "qemu:allocation-depth")),
            BackingTests.Normalize(await Extents(device, device.MetaContexts.Single(c => c.Name == "qemu:allocation-depth"))));
    }

    /// <summary>Every extent of the device (base:allocation) or of a metadata context, as (offset, length, status).</summary>
    internal static async Task<List<(long, long, uint)>> Extents(Spindle.Storage.BlockDevice device, Spindle.Storage.MetaContextSource? context)
    {
        var list = new List<(long, long, uint)>();
        var extents = new Spindle.Storage.ExtentList(1 << 16);
        for (long offset = 0; offset < device.Size;)
        {
            extents.Clear(1 << 16);
            if (context is null)
            {
                await device.GetExtentsAsync(offset, device.Size - offset, extents, CancellationToken.None);
            }
            else
            {
                await context.GetStatusAsync(offset, device.Size - offset, extents, CancellationToken.None);
            }

            foreach (var extent in extents.Items)
            {
                list.Add((offset, extent.Length, extent.Status));
                offset += extent.Length;
            }
        }

        return list;
    }

    /// <summary>Patterns at cluster edges, inside subclusters, zeroes (-z) and discards over data: every cluster kind.</summary>
    internal static string[] FillCommands(long size) =>
    [
        "write -P 0x11 0 1M",
        "write -P 0x22 1536 3000",
        "write -P 0x33 2M 64k",
        "write -z 2080k 8k",
        "write -P 0x44 3M 4k",
        "discard 3M 64k",
        $"write -P 0x55 {size - 8192} 8192",
        $"write -P 0x66 {size / 2 + 512} 777",
        $"write -z {size / 2 + 65536} 131072",
    ];

    [Theory]
    [InlineData("zlib")]
    [InlineData("zstd")]
    public async Task Compressed_image_from_qemu_img_convert_reads_as_qemu_reads_it(string compression)
    {
        using var directory = new TempDirectory();
        var source = directory.File("source.raw");
        await Qemu.Img("create", "-q", "-f", "raw", source, "16M");
        var random = new Random(7);
        await using (var file = new FileStream(source, FileMode.Open, FileAccess.Write))
        {
            // Compressible text-like runs, incompressible noise and holes.
            var buffer = new byte[256 * 1024];
            for (var i = 0; i < buffer.Length; i++)
            {
                buffer[i] = (byte)(i % 97 < 60 ? 'a' + (i % 26) : random.Next(256));
            }

            file.Position = 1 << 20;
            await file.WriteAsync(buffer);
            file.Position = 9 << 20;
            await file.WriteAsync(buffer.AsMemory(0, 100_000));
        }

        var image = directory.File("compressed.qcow2");
        await Qemu.Img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", $"compression_type={compression},cluster_size=65536", source, image);
        await using (var device = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Assert.Equal(compression, device.CompressionType);
            await Qemu.DumpToRaw(device, directory.File("dump.raw"));
        }

        Assert.True(await Qemu.Same(directory.File("dump.raw"), "raw", source, "raw"));

        // Overwriting compressed clusters copies them into normal clusters and releases the compressed sectors
        // (several compressed clusters share a host cluster: its refcount counts them).
        var operations = new Random(11);
        await using (var model = new FileStream(source, FileMode.Open, FileAccess.ReadWrite))
        await using (var device = Qcow2Image.Open(image))
        {
            for (var i = 0; i < 150; i++)
            {
                await WriteTests.RandomOperation(device, model, operations, 16L << 20, device.ClusterSize);
            }
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        Assert.True(await Qemu.Same(source, "raw", image, "qcow2"));
    }

    [Fact]
    public async Task Probe_recognises_qcow2_by_its_magic()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "probe.qcow2", "compat=1.1", 1 << 20);
        Assert.True(Qcow2Image.IsQcow2File(image));
        Assert.True(Qcow2Image.IsQcow2([0x51, 0x46, 0x49, 0xFB]));
        Assert.False(Qcow2Image.IsQcow2("QFI"u8));
        Assert.False(Qcow2Image.IsQcow2(new byte[512]));
        var raw = directory.CreateSparseFile("raw.img", 1 << 20);
        Assert.False(Qcow2Image.IsQcow2File(raw));
        Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(raw));
    }
}
