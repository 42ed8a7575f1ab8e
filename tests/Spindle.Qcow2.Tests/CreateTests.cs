using System.Globalization;
using System.Text.Json;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>
/// Image creation (<see cref="Qcow2Image.Create"/>) against <c>qemu-img create -f qcow2</c>: the same file where
/// qemu's layout applies, the same <c>qemu-img info</c>, a clean <c>qemu-img check</c>, and reads through to the base.
/// </summary>
public sealed class CreateTests
{
    private const long BaseSize = 24L << 20;

    private static readonly string[] InfoFields = ["virtual-size", "cluster-size", "format", "backing-filename", "full-backing-filename", "backing-filename-format", "dirty-flag"];

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public async Task An_overlay_is_byte_for_byte_what_qemu_img_create_writes(string baseFormat)
    {
        using var directory = new TempDirectory();
        var baseName = "base." + baseFormat;
        await CreateBase(directory, baseName, baseFormat);
        var qemu = directory.File("qemu.qcow2");
        var ours = directory.File("ours.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-b", baseName, "-F", baseFormat, qemu);
        Qcow2Image.Create(ours, new Qcow2CreateOptions { BackingFile = baseName, BackingFormat = baseFormat });

        Assert.Equal(await File.ReadAllBytesAsync(qemu), await File.ReadAllBytesAsync(ours));
        await AssertSameInfo(qemu, ours);
        await Qemu.AssertConsistent(ours, allowLeaks: false);
        Assert.Equal(new[] { "base." + baseFormat, "ours.qcow2", "qemu.qcow2" }, Directory.GetFiles(directory.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public async Task The_backing_format_is_detected_and_the_size_taken_from_the_base(string baseFormat)
    {
        using var directory = new TempDirectory();
        await CreateBase(directory, "base.img", baseFormat);
        var ours = directory.File("ours.qcow2");
        Qcow2Image.Create(ours, new Qcow2CreateOptions { BackingFile = "base.img" });

        using var info = await Qemu.Info(ours);
        var root = info.RootElement;
        Assert.Equal(BaseSize, root.GetProperty("virtual-size").GetInt64());
        Assert.Equal(baseFormat, root.GetProperty("backing-filename-format").GetString());
        Assert.Equal("base.img", root.GetProperty("backing-filename").GetString());
        Assert.Equal(directory.File("base.img"), root.GetProperty("full-backing-filename").GetString());
        await Qemu.AssertConsistent(ours, allowLeaks: false);
    }

    [Theory]
    [InlineData(0L, 65536)]
    [InlineData(1000L, 65536)]
    [InlineData(100L << 20, 65536)]
    [InlineData(5L << 40, 65536)]
    [InlineData(1L << 20, 4096)]
    [InlineData(3L << 20, 8192)]
    public async Task Images_without_a_backing_file_are_what_qemu_img_create_writes(long size, int clusterSize)
    {
        using var directory = new TempDirectory();
        var qemu = directory.File("qemu.qcow2");
        var ours = directory.File("ours.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", qemu, size.ToString(CultureInfo.InvariantCulture));
        Qcow2Image.Create(ours, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize });

        Assert.Equal(await File.ReadAllBytesAsync(qemu), await File.ReadAllBytesAsync(ours));
        await AssertSameInfo(qemu, ours);
        await Qemu.AssertConsistent(ours, allowLeaks: false);
    }

    [Theory]
    [InlineData(512, 1L << 30)] // the L1 table (512 clusters) needs three refcount blocks: a layout of our own
    [InlineData(1024, 256L << 30)] // 16384 L1 clusters: 33 refcount blocks
    public async Task Images_whose_metadata_outgrows_one_refcount_block_are_consistent_and_writable(int clusterSize, long size)
    {
        using var directory = new TempDirectory();
        var ours = directory.File("ours.qcow2");
        Qcow2Image.Create(ours, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize });
        await Qemu.AssertConsistent(ours, allowLeaks: false);
        using (var info = await Qemu.Info(ours))
        {
            Assert.Equal(size, info.RootElement.GetProperty("virtual-size").GetInt64());
            Assert.Equal(clusterSize, info.RootElement.GetProperty("cluster-size").GetInt32());
        }

        await Qemu.Io(ours, "qcow2", "write -P 0x4c 0 64k", $"write -P 0x4d {size - 4096} 4096");
        await using (var image = Qcow2Image.Open(ours))
        {
            var buffer = new byte[4096];
            await image.ReadAsync(size - 4096, buffer, CancellationToken.None);
            Assert.All(buffer, b => Assert.Equal(0x4d, b));
            await image.WriteAsync(1 << 20, new byte[4096].Select(_ => (byte)0x4e).ToArray(), fua: false, CancellationToken.None);
        }

        await Qemu.Io(ours, "qcow2", "read -P 0x4c 0 64k", "read -P 0x4e 1M 4k");
        await Qemu.AssertConsistent(ours, allowLeaks: false);
    }

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public async Task Reads_go_through_to_the_base_and_writes_stay_in_the_overlay(string baseFormat)
    {
        using var directory = new TempDirectory();
        var basePath = await CreateBase(directory, "base.img", baseFormat);
        var before = await File.ReadAllBytesAsync(basePath);
        var ours = directory.File("ours.qcow2");
        Qcow2Image.Create(ours, new Qcow2CreateOptions { BackingFile = "base.img", BackingFormat = baseFormat });

        // qemu-io reads the base's bytes through the new image, and writes into it.
        await Qemu.Io(ours, "qcow2", "read -P 0xb1 0 3M", "read -P 0 3M 3M", "read -P 0xb2 6M 100k", $"read -P 0xb3 {BaseSize - 4096} 4096");
        await Qemu.Io(ours, "qcow2", "write -P 0xd1 1M 64k", "write -z 6M 4k");

        // Spindle reads the same combination, and its own writes land in the overlay too.
        await using (var image = Qcow2Image.Open(ours))
        {
            Assert.Equal(BaseSize, image.Size);
            Assert.Single(image.BackingChain);
            await image.WriteAsync(10 << 20, Enumerable.Repeat((byte)0xd2, 8192).ToArray(), fua: false, CancellationToken.None);
            await Qemu.DumpToRaw(image, directory.File("dump.raw"));
        }

        Assert.True(await Qemu.Same(directory.File("dump.raw"), "raw", ours, "qcow2"));
        await Qemu.Io(ours, "qcow2", "read -P 0xd1 1M 64k", "read -P 0 6M 4k", "read -P 0xb2 6148k 96k", "read -P 0xd2 10M 8k");
        await Qemu.AssertConsistent(ours, allowLeaks: false);
        Assert.Equal(before, await File.ReadAllBytesAsync(basePath));
    }

    [Fact]
    public async Task An_existing_file_is_never_replaced_and_nothing_is_left_behind()
    {
        using var directory = new TempDirectory();
        await CreateBase(directory, "base.img", "raw");
        var target = directory.File("taken.qcow2");
        await File.WriteAllTextAsync(target, "someone else's file");

        var exception = Assert.ThrowsAny<IOException>(() => Qcow2Image.Create(target, new Qcow2CreateOptions { BackingFile = "base.img" }));
        Assert.Contains("already exists", exception.Message, StringComparison.Ordinal);
        Assert.Equal("someone else's file", await File.ReadAllTextAsync(target));

        Assert.Throws<FileNotFoundException>(() => Qcow2Image.Create(directory.File("a.qcow2"), new Qcow2CreateOptions { BackingFile = "missing.img" }));
        Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Create(directory.File("b.qcow2"), new Qcow2CreateOptions { BackingFile = "base.img", BackingFormat = "qcow2" }));
        Assert.Throws<ArgumentException>(() => Qcow2Image.Create(directory.File("c.qcow2"), new Qcow2CreateOptions()));
        Assert.Throws<ArgumentException>(() => Qcow2Image.Create(directory.File("d.qcow2"), new Qcow2CreateOptions { Size = 1 << 20, ClusterSize = 3000 }));
        Assert.Throws<ArgumentException>(() => Qcow2Image.Create(directory.File("e.qcow2"), new Qcow2CreateOptions { BackingFile = "base.img", BackingFormat = "vmdk" }));
        Assert.Throws<DirectoryNotFoundException>(() => Qcow2Image.Create(directory.File("no/such/dir.qcow2"), new Qcow2CreateOptions { Size = 1 << 20 }));

        // Only the two files made above: no temporary file survives a refusal.
        Assert.Equal(new[] { "base.img", "taken.qcow2" }, Directory.GetFiles(directory.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    private static async Task<string> CreateBase(TempDirectory directory, string name, string format)
    {
        var path = directory.File(name);
        await Qemu.Img("create", "-q", "-f", format, path, BaseSize.ToString(CultureInfo.InvariantCulture));
        await Qemu.Io(path, format, "write -P 0xb1 0 3M", "write -P 0xb2 6M 100k", $"write -P 0xb3 {BaseSize - 4096} 4096");
        return path;
    }

    private static async Task AssertSameInfo(string qemu, string ours)
    {
        using var expected = await Qemu.Info(qemu);
        using var actual = await Qemu.Info(ours);
        foreach (var field in InfoFields)
        {
            var hasExpected = expected.RootElement.TryGetProperty(field, out var expectedValue);
            var hasActual = actual.RootElement.TryGetProperty(field, out var actualValue);
            Assert.Equal(hasExpected, hasActual);
            if (hasExpected)
            {
                var expectedText = expectedValue.ToString().Replace("qemu.qcow2", "IMAGE", StringComparison.Ordinal);
                Assert.Equal(expectedText, actualValue.ToString().Replace("ours.qcow2", "IMAGE", StringComparison.Ordinal));
            }
        }

        Assert.Equal(
            expected.RootElement.GetProperty("format-specific").GetRawText(),
            actual.RootElement.GetProperty("format-specific").GetRawText());
        Assert.Equal(JsonValueKind.Object, actual.RootElement.GetProperty("format-specific").ValueKind);
    }
}
