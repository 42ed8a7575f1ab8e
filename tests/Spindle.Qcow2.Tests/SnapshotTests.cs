using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>Internal snapshots made by qemu-img snapshot -c: listed, opened read-only, and kept intact by writes.</summary>
public sealed class SnapshotTests
{
    [Theory]
    [InlineData("compat=1.1,cluster_size=65536")]
    [InlineData("compat=0.10,cluster_size=4096")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    public async Task Snapshots_are_listed_and_read_as_qemu_reads_them(string options)
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "snap.qcow2", options, 16L << 20);
        await Qemu.Io(image, "qcow2", "write -P 0x01 0 4M");
        await Qemu.Img("snapshot", "-c", "first", image);
        await Qemu.Io(image, "qcow2", "write -P 0x02 1M 1M", "write -z 3M 64k");
        await Qemu.Img("snapshot", "-c", "second", image);
        await Qemu.Io(image, "qcow2", "write -P 0x03 2M 4M");

        await using (var active = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Assert.Equal(["first", "second"], active.Snapshots.Select(s => s.Name));
            Assert.Equal(["1", "2"], active.Snapshots.Select(s => s.Id));
            Assert.All(active.Snapshots, s => Assert.Equal(16L << 20, s.VirtualSize));
            Assert.All(active.Snapshots, s => Assert.True(Math.Abs((DateTimeOffset.UtcNow - s.Date).TotalMinutes) < 10));
        }

        foreach (var (name, byId) in new[] { ("first", "1"), ("second", "second") })
        {
            await using var snapshot = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true, Snapshot = byId });
            Assert.Equal(name, snapshot.ActiveSnapshot!.Name);
            await Qemu.DumpToRaw(snapshot, directory.File($"{name}.raw"));
            await Qemu.Img("convert", "-q", "-f", "qcow2", "-l", $"snapshot.name={name}", "-O", "raw", image, directory.File($"{name}.qemu.raw"));
            Assert.True(await Qemu.Same(directory.File($"{name}.raw"), "raw", directory.File($"{name}.qemu.raw"), "raw"), $"snapshot {name} differs");
        }

        Assert.Throws<ArgumentException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { Snapshot = "first" }));
        Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true, Snapshot = "nope" }));
    }

    [Theory]
    [InlineData("compat=1.1,cluster_size=65536")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    [InlineData("compat=0.10,cluster_size=4096")]
    public async Task Writes_to_the_active_image_copy_on_write_and_leave_snapshots_intact(string options)
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "cow.qcow2", options, 16L << 20);
        await Qemu.Io(image, "qcow2", "write -P 0x01 0 8M");
        await Qemu.Img("snapshot", "-c", "base", image);
        await Qemu.Img("convert", "-q", "-f", "qcow2", "-l", "snapshot.name=base", "-O", "raw", image, directory.File("before.raw"));
        var model = directory.File("model.raw");
        File.Copy(directory.File("before.raw"), model);

        var random = new Random(3);
        await using (var modelFile = new FileStream(model, FileMode.Open, FileAccess.ReadWrite))
        await using (var device = Qcow2Image.Open(image))
        {
            for (var i = 0; i < 150; i++)
            {
                await WriteTests.RandomOperation(device, modelFile, random, 16L << 20, device.ClusterSize);
            }
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        Assert.True(await Qemu.Same(model, "raw", image, "qcow2"));
        await Qemu.Img("convert", "-q", "-f", "qcow2", "-l", "snapshot.name=base", "-O", "raw", image, directory.File("after.raw"));
        Assert.True(await Qemu.Same(directory.File("before.raw"), "raw", directory.File("after.raw"), "raw"), "the snapshot changed");
    }
}
