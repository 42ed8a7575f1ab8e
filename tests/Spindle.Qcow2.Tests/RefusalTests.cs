using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>What the backend refuses, and that it says why.</summary>
public sealed class RefusalTests
{
    [Fact]
    public async Task Encrypted_images_are_refused_clearly()
    {
        using var directory = new TempDirectory();
        var image = directory.File("luks.qcow2");
        // qemu-img times its PBKDF first; on a loaded machine that measurement can fail ("Unable to get accurate CPU
        // usage"), so creation is tried a few times.
        ProcessResult? created = null;
        for (var attempt = 0; attempt < 5 && created?.ExitCode != 0; attempt++)
        {
            created = await PeerTool.RunAsync("qemu-img", ["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=hunter2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=300", image, "1M"]);
        }

        Assert.True(created!.ExitCode == 0, $"qemu-img create (LUKS): {created}");
        var error = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Contains("encrypted (LUKS)", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task External_data_files_are_refused_clearly()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "external.qcow2", $"data_file={directory.File("data.raw")}", 1 << 20);
        var error = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Contains("external data file", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Unknown_incompatible_features_are_refused_by_name()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "future.qcow2", "compat=1.1", 1 << 20);
        SetIncompatibleBits(image, 1UL << 5 | 1UL << 40);
        var error = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Contains("bit 5", error.Message, StringComparison.Ordinal);
        Assert.Contains("bit 40", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Corrupt_images_open_read_only_but_not_for_writing()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "corrupt.qcow2", "compat=1.1", 1 << 20);
        await Qemu.Io(image, "qcow2", "write -P 7 0 64k");
        SetIncompatibleBits(image, 1UL << 1);
        var error = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image));
        Assert.Contains("marked corrupt", error.Message, StringComparison.Ordinal);
        await using var device = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        Assert.True(device.IsCorrupt);
        var buffer = new byte[4096];
        await device.ReadAsync(0, buffer, CancellationToken.None);
        Assert.All(buffer, b => Assert.Equal(7, b));
    }

    [Fact]
    public async Task A_dirty_image_with_lazy_refcounts_is_refused_for_writing_when_repair_is_off()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "dirty.qcow2", "compat=1.1,lazy_refcounts=on", 1 << 20);
        SetIncompatibleBits(image, 1UL << 0);
        var error = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { RepairDirtyRefcounts = false }));
        Assert.Contains("dirty", error.Message, StringComparison.Ordinal);
        Assert.Contains("qemu-img check -r all", error.Message, StringComparison.Ordinal);
        await using var device = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        Assert.Equal(1 << 20, device.Size);
    }

    [Theory]
    [InlineData("compat=1.1,lazy_refcounts=on,cluster_size=65536")]
    [InlineData("compat=1.1,lazy_refcounts=on,cluster_size=4096,refcount_bits=8")]
    [InlineData("compat=1.1,lazy_refcounts=on,cluster_size=65536,extended_l2=on")]
    public async Task A_dirty_image_left_by_a_qemu_crash_has_its_refcounts_rebuilt_on_writable_open(string options)
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "lazy.qcow2", options, 16L << 20);
        await Qemu.Io(image, "qcow2", "write -P 1 0 2M");
        await Qemu.Img("snapshot", "-c", "s1", image);
        await Qemu.Img("bitmap", "--add", image, "b1");

        // qemu-io's abort command crashes qemu-io mid-session: with lazy refcounts the image stays dirty.
        var crashed = await PeerTool.RunAsync("qemu-io", ["-f", "qcow2", "-c", "write -P 2 1M 2M", "-c", "write -P 3 8M 1M", "-c", "flush", "-c", "abort", image]);
        Assert.NotEqual(0, crashed.ExitCode);
        using (var info = await Qemu.Info(image, "-U"))
        {
            Assert.True(info.RootElement.GetProperty("dirty-flag").GetBoolean(), "qemu-io abort did not leave the image dirty");
        }

        var model = directory.File("model.raw");
        await Qemu.Img("convert", "-q", "-U", "-f", "qcow2", "-O", "raw", image, model);
        await using (var modelFile = new FileStream(model, FileMode.Open, FileAccess.ReadWrite))
        await using (var device = Qcow2Image.Open(image))
        {
            Assert.True(device.RefcountsRebuilt);
            var random = new Random(9);
            for (var i = 0; i < 100; i++)
            {
                await WriteTests.RandomOperation(device, modelFile, random, 16L << 20, device.ClusterSize);
            }
        }

        using (var info = await Qemu.Info(image))
        {
            Assert.False(info.RootElement.GetProperty("dirty-flag").GetBoolean());
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        Assert.True(await Qemu.Same(model, "raw", image, "qcow2"));
    }

    [Fact]
    public async Task A_write_that_would_land_on_metadata_fails_and_marks_the_image_corrupt()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "overlap.qcow2", "compat=1.1,cluster_size=65536", 16L << 20);
        await Qemu.Io(image, "qcow2", "write -P 1 0 64k");

        // Point the first L2 entry at the L1 table's cluster, with the "refcount is 1" flag: a write there would
        // overwrite the L1 table.
        var bytes = await File.ReadAllBytesAsync(image);
        var l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        var l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)l1)) & 0x00FF_FFFF_FFFF_FE00);
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan((int)l2), (ulong)l1 | 1UL << 63);
        await File.WriteAllBytesAsync(image, bytes);

        await using (var device = Qcow2Image.Open(image))
        {
            var error = await Assert.ThrowsAsync<BlockDeviceException>(async () => await device.WriteAsync(0, new byte[4096], fua: false, CancellationToken.None));
            Assert.Equal(NbdError.IO, error.Error);
            Assert.Contains("overwrite metadata", error.Message, StringComparison.Ordinal);
            Assert.True(device.IsCorrupt);
        }

        using var info = await Qemu.Info(image);
        Assert.True(info.RootElement.GetProperty("format-specific").GetProperty("data").GetProperty("corrupt").GetBoolean());
        Assert.Equal(l1, (long)BinaryPrimitives.ReadUInt64BigEndian((await File.ReadAllBytesAsync(image)).AsSpan(40)));
    }

    [Fact]
    public async Task A_metadata_cluster_with_refcount_zero_is_never_allocated()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "refcount.qcow2", "compat=1.1,cluster_size=65536", 16L << 20);
        var bytes = await File.ReadAllBytesAsync(image);
        var l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        SetRefcount(bytes, l1 / 65536, 0); // the L1 table's cluster now looks free
        await File.WriteAllBytesAsync(image, bytes);

        await using var device = Qcow2Image.Open(image);
        var error = await Assert.ThrowsAsync<BlockDeviceException>(async () => await device.WriteAsync(0, new byte[4096], fua: false, CancellationToken.None));
        Assert.Equal(NbdError.IO, error.Error);
        Assert.Contains("holds metadata", error.Message, StringComparison.Ordinal);
        Assert.True(device.IsCorrupt);
        Assert.Equal(l1, (long)BinaryPrimitives.ReadUInt64BigEndian((await File.ReadAllBytesAsync(image)).AsSpan(40)));
    }

    [Fact]
    public async Task A_refcount_that_would_drop_below_zero_fails_the_flush_and_marks_the_image_corrupt()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "underflow.qcow2", "compat=1.1,cluster_size=65536", 16L << 20);
        await Qemu.Io(image, "qcow2", "write -P 3 0 64k");
        var bytes = await File.ReadAllBytesAsync(image);
        var l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        var l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)l1)) & 0x00FF_FFFF_FFFF_FE00);
        var data = (long)(BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)l2)) & 0x00FF_FFFF_FFFF_FE00);
        SetRefcount(bytes, data / 65536, 0);
        await File.WriteAllBytesAsync(image, bytes);

        await using var device = Qcow2Image.Open(image);
        await device.TrimAsync(0, 65536, fua: false, CancellationToken.None);
        var error = await Assert.ThrowsAsync<BlockDeviceException>(async () => await device.FlushAsync(CancellationToken.None));
        Assert.Contains("below zero", error.Message, StringComparison.Ordinal);
        Assert.True(device.IsCorrupt);
        await Assert.ThrowsAsync<BlockDeviceException>(async () => await device.WriteAsync(0, new byte[512], fua: false, CancellationToken.None));
    }

    [Fact]
    public async Task A_refcount_overflow_found_by_the_dirty_rebuild_refuses_the_writable_open_without_touching_the_file()
    {
        // 1-bit refcounts (qcow2.txt header refcount_order 0) and 512-byte clusters: one refcount block covers 4096
        // clusters (2 MiB of file), so 3 MiB of data puts the shared cluster beyond the first block the rebuild writes.
        using var directory = new TempDirectory();
        const int cluster = 512;
        var image = await Qemu.Create(directory, "overflow.qcow2", "compat=1.1,lazy_refcounts=on,refcount_bits=1,cluster_size=512", 4L << 20);
        await Qemu.Io(image, "qcow2", "write -P 1 0 1M", "write -P 2 1M 2M");

        // The L2 entry of guest cluster 0 now names the host cluster of the last guest cluster written too, both
        // without the "refcount is exactly one" flag (bit 63), so the rebuild counts 2 references for it.
        var bytes = await File.ReadAllBytesAsync(image);
        var l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40));
        const long entriesPerL2 = cluster / 8;
        long L2Entry(long guest)
        {
            var l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)(l1 + (guest / cluster / entriesPerL2 * 8)))) & 0x00FF_FFFF_FFFF_FE00);
            Assert.NotEqual(0, l2);
            return l2 + (guest / cluster % entriesPerL2 * 8);
        }

        var last = L2Entry((3L << 20) - cluster);
        var shared = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)last)) & 0x00FF_FFFF_FFFF_FE00;
        Assert.True(shared >= 4096 * cluster, $"the shared cluster 0x{shared:x} lies within the first refcount block");
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan((int)last), shared);
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan((int)L2Entry(0)), shared);
        await File.WriteAllBytesAsync(image, bytes);
        SetIncompatibleBits(image, 1UL << 0);
        var before = await File.ReadAllBytesAsync(image);

        var error = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image));
        Assert.Contains($"cluster {shared / cluster} has 2 references, more than 1-bit refcounts hold", error.Message, StringComparison.Ordinal);
        Assert.Equal(before, await File.ReadAllBytesAsync(image));

        // Read-only, the image still reads as its tables say: guest cluster 0 now shows the shared cluster's data.
        await using var device = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        var buffer = new byte[cluster * 2];
        await device.ReadAsync(0, buffer, CancellationToken.None);
        Assert.All(buffer.AsSpan(0, cluster).ToArray(), b => Assert.Equal(2, b));
        Assert.All(buffer.AsSpan(cluster).ToArray(), b => Assert.Equal(1, b));
        await device.ReadAsync((3L << 20) - cluster, buffer.AsMemory(0, cluster), CancellationToken.None);
        Assert.All(buffer.AsSpan(0, cluster).ToArray(), b => Assert.Equal(2, b));
        Assert.Equal(before, await File.ReadAllBytesAsync(image));
    }

    /// <summary>Sets a 16-bit refcount (the default refcount_order 4) in the image's first refcount block.</summary>
    private static void SetRefcount(byte[] image, long cluster, ushort value)
    {
        var reftable = (long)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(48));
        var block = (long)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan((int)reftable));
        BinaryPrimitives.WriteUInt16BigEndian(image.AsSpan((int)(block + (cluster * 2))), value);
    }

    private static void SetIncompatibleBits(string image, ulong bits)
    {
        using var file = new FileStream(image, FileMode.Open, FileAccess.ReadWrite);
        var field = new byte[8];
        file.Position = 72;
        file.ReadExactly(field);
        BinaryPrimitives.WriteUInt64BigEndian(field, BinaryPrimitives.ReadUInt64BigEndian(field) | bits);
        file.Position = 72;
        file.Write(field);
    }
}
