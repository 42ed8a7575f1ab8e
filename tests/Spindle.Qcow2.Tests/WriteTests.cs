using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>Writes, zeroes, trims and flushes through the backend, checked by qemu-img check and compare.</summary>
public sealed class WriteTests
{
    public static TheoryData<string, long> Layouts => new()
    {
        { "compat=0.10,cluster_size=65536", 32L << 20 },
        { "compat=0.10,cluster_size=4096", 8L << 20 },
        { "compat=1.1,cluster_size=512,refcount_bits=64", 8L << 20 },
        { "compat=1.1,cluster_size=512,refcount_bits=1", 4L << 20 },
        { "compat=1.1,cluster_size=4096", 16L << 20 },
        { "compat=1.1,cluster_size=65536", 32L << 20 },
        { "compat=1.1,cluster_size=2097152", 32L << 20 },
        { "compat=1.1,cluster_size=65536,extended_l2=on", 32L << 20 },
        { "compat=1.1,cluster_size=16384,extended_l2=on,refcount_bits=8", 8L << 20 },
        { "compat=1.1,cluster_size=65536,lazy_refcounts=on", 16L << 20 },
        { "compat=1.1,cluster_size=65536,preallocation=metadata", 16L << 20 },
    };

    [Theory]
    [MemberData(nameof(Layouts))]
    public async Task Random_writes_zeroes_and_trims_read_back_in_qemu_and_check_clean(string options, long size)
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "image.qcow2", options, size);
        await Qemu.Io(image, "qcow2", ReadTests.FillCommands(size));
        var model = directory.File("model.raw");
        await Qemu.Img("convert", "-q", "-f", "qcow2", "-O", "raw", image, model);

        var clusterSize = 0;
        var random = new Random(options.GetHashCode(StringComparison.Ordinal) & 0xFFFF);
        await using (var modelFile = new FileStream(model, FileMode.Open, FileAccess.ReadWrite))
        {
            for (var round = 0; round < 3; round++)
            {
                // Reopen between rounds: what was written must survive a close and open.
                await using var device = Qcow2Image.Open(image);
                clusterSize = device.ClusterSize;
                for (var op = 0; op < 120; op++)
                {
                    await RandomOperation(device, modelFile, random, size, clusterSize);
                }
            }
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        Assert.True(await Qemu.Same(model, "raw", image, "qcow2"), $"{options}: the image differs from the model");
    }

    /// <summary>One random write, zero, trim or flush, applied to the device and to a raw model file.</summary>
    internal static async Task RandomOperation(BlockDevice device, FileStream model, Random random, long size, int clusterSize)
    {
        var kind = random.Next(20);
        var maxLength = random.Next(4) == 0 ? 3 * clusterSize + 1000 : 70_000;
        var offset = (long)(random.NextDouble() * (size - 1));
        var length = (int)Math.Min(random.Next(1, maxLength), size - offset);
        if (random.Next(3) == 0)
        {
            offset &= ~511L;
            length = Math.Max(512, length & ~511);
            length = (int)Math.Min(length, size - offset);
        }

        if (kind < 12)
        {
            var data = Patterns.Random(length, random.Next());
            await device.WriteAsync(offset, data, fua: random.Next(8) == 0, CancellationToken.None);
            model.Position = offset;
            await model.WriteAsync(data);
        }
        else if (kind < 16)
        {
            var flags = (random.Next(2) == 0 ? ZeroFlags.NoHole : ZeroFlags.None) | (random.Next(4) == 0 ? ZeroFlags.Fua : ZeroFlags.None);
            await device.WriteZeroesAsync(offset, length, flags, CancellationToken.None);
            model.Position = offset;
            await model.WriteAsync(new byte[length]);
        }
        else if (kind < 19)
        {
            // TRIM discards whole clusters only, which then read as zeroes (no backing file here).
            await device.TrimAsync(offset, length, fua: false, CancellationToken.None);
            var first = (offset + clusterSize - 1) / clusterSize * clusterSize;
            var end = offset + length == size ? size : (offset + length) / clusterSize * clusterSize;
            if (end > first)
            {
                model.Position = first;
                await model.WriteAsync(new byte[end - first]);
            }
        }
        else
        {
            await device.FlushAsync(CancellationToken.None);
        }
    }

    [Fact]
    public async Task Writes_that_outgrow_the_refcount_table_grow_it_consistently()
    {
        using var directory = new TempDirectory();
        // 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB, the first table 2 MiB.
        var image = await Qemu.Create(directory, "grow.qcow2", "compat=1.1,cluster_size=512,refcount_bits=64", 16L << 20);
        var data = Patterns.Generate(0, 1 << 20);
        await using (var device = Qcow2Image.Open(image))
        {
            for (long offset = 0; offset < 12L << 20; offset += data.Length)
            {
                await device.WriteAsync(offset, data, fua: false, CancellationToken.None);
            }
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        for (long offset = 0; offset < 12L << 20; offset += 4L << 20)
        {
            await Qemu.Io(image, "qcow2", $"read -P 0 {(12L << 20) + offset / 4} 4096");
        }

        await using var reopened = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        var back = new byte[data.Length];
        await reopened.ReadAsync(5L << 20, back, CancellationToken.None);
        Assert.Equal(data, back);
    }

    [Fact]
    public async Task Trim_frees_clusters_and_punches_holes_in_the_file()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "trim.qcow2", "compat=1.1,cluster_size=65536", 64L << 20);
        await using (var device = Qcow2Image.Open(image))
        {
            await device.WriteAsync(0, Patterns.Generate(0, 32 << 20), fua: false, CancellationToken.None);
            await device.FlushAsync(CancellationToken.None);
        }

        var allocatedBefore = AllocatedBytes(image);
        await using (var device = Qcow2Image.Open(image))
        {
            await device.TrimAsync(0, 32 << 20, fua: false, CancellationToken.None);
            await device.FlushAsync(CancellationToken.None);
            var extents = new ExtentList();
            await device.GetExtentsAsync(0, 64 << 20, extents, CancellationToken.None);
            Assert.Equal(AllocationFlags.Hole | AllocationFlags.Zero, extents[0].Flags);
        }

        Assert.True(AllocatedBytes(image) < allocatedBefore - (30L << 20), $"{AllocatedBytes(image)} bytes still allocated of {allocatedBefore}");
        await Qemu.AssertConsistent(image, allowLeaks: false);
        await Qemu.Io(image, "qcow2", "read -P 0 0 32M");

        // The freed clusters are reused by the next writes: the file does not grow.
        var length = new FileInfo(image).Length;
        await using (var device = Qcow2Image.Open(image))
        {
            await device.WriteAsync(40 << 20, Patterns.Generate(0, 8 << 20), fua: true, CancellationToken.None);
        }

        Assert.Equal(length, new FileInfo(image).Length);
        await Qemu.AssertConsistent(image, allowLeaks: false);
    }

    private static long AllocatedBytes(string path)
    {
        var result = PeerTool.RunAsync("stat", ["-c", "%b %B", path]).GetAwaiter().GetResult();
        var parts = result.StandardOutput.Trim().Split(' ');
        return long.Parse(parts[0], System.Globalization.CultureInfo.InvariantCulture) * long.Parse(parts[1], System.Globalization.CultureInfo.InvariantCulture);
    }

    [Fact]
    public async Task Concurrent_writers_on_one_device_leave_a_consistent_image()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "concurrent.qcow2", "compat=1.1,cluster_size=65536,extended_l2=on", 64L << 20);
        const int Writers = 8;
        const int Slot = 8 << 20;
        await using (var device = Qcow2Image.Open(image))
        {
            var tasks = Enumerable.Range(0, Writers).Select(writer => Task.Run(async () =>
            {
                var random = new Random(writer);
                for (var i = 0; i < 300; i++)
                {
                    // Each writer owns one 8 MiB slot: the final content is known per slot.
                    var offset = (long)writer * Slot + (random.Next(Slot / 4096) * 4096L);
                    await device.WriteAsync(offset, new byte[4096].Select(_ => (byte)(writer + 1)).ToArray(), fua: false, CancellationToken.None);
                    if (i % 50 == 0)
                    {
                        await device.FlushAsync(CancellationToken.None);
                    }

                    if (i % 97 == 0)
                    {
                        await device.TrimAsync((long)writer * Slot + (Slot / 2), Slot / 2, fua: false, CancellationToken.None);
                    }
                }
            })).ToArray();

            // Readers run meanwhile, through both read paths: every byte of a slot is 0 or its writer's.
            var readers = Enumerable.Range(0, 4).Select(reader => Task.Run(async () =>
            {
                var random = new Random(100 + reader);
                var buffer = new byte[65536];
                while (!tasks.All(t => t.IsCompleted))
                {
                    var slot = random.Next(Writers);
                    var offset = (long)slot * Slot + (random.Next(Slot / 65536) * 65536L);
                    if (!device.TryReadImmediate(offset, buffer))
                    {
                        await device.ReadAsync(offset, buffer, CancellationToken.None);
                    }

                    var bad = buffer.AsSpan().IndexOfAnyExcept((byte)0, (byte)(slot + 1));
                    Assert.True(bad < 0, $"slot {slot} holds a foreign byte at {offset + Math.Max(bad, 0)}");
                }
            })).ToArray();
            await Task.WhenAll(tasks.Concat(readers));
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        await using var reopened = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
        var buffer = new byte[Slot];
        for (var writer = 0; writer < Writers; writer++)
        {
            await reopened.ReadAsync((long)writer * Slot, buffer, CancellationToken.None);
            Assert.All(buffer, b => Assert.True(b == 0 || b == writer + 1));
        }
    }

    [Fact]
    public async Task Immediate_paths_serve_owned_cached_clusters_and_decline_the_rest()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "immediate.qcow2", "compat=1.1,cluster_size=65536", 8L << 20);
        await Qemu.Io(image, "qcow2", "write -P 0x11 0 1M");
        await Qemu.Img("snapshot", "-c", "s", image);
        await Qemu.Io(image, "qcow2", "write -P 0x22 2M 1M");
        await using (var device = Qcow2Image.Open(image))
        {
            var buffer = new byte[8192];
            await device.ReadAsync(2 << 20, buffer, CancellationToken.None); // loads the L2 table

            // Owned (written after the snapshot): served at once. Shared with the snapshot or unallocated: declined.
            Assert.True(device.TryWriteImmediate((2 << 20) + 4096, Enumerable.Repeat((byte)0x33, 4096).ToArray()));
            Assert.False(device.TryWriteImmediate(4096, new byte[4096]));
            Assert.False(device.TryWriteImmediate(5 << 20, new byte[4096]));
            if (device.TryReadImmediate(2 << 20, buffer))
            {
                Assert.All(buffer.AsSpan(0, 4096).ToArray(), b => Assert.Equal(0x22, b));
                Assert.All(buffer.AsSpan(4096).ToArray(), b => Assert.Equal(0x33, b));
            }

            Assert.True(device.TryReadImmediate(6 << 20, buffer)); // unallocated, no backing file: zeroes
            Assert.All(buffer, b => Assert.Equal(0, b));
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        await Qemu.Io(image, "qcow2", "read -P 0x33 2101248 4096", "read -P 0x11 4096 4096");
    }
}
