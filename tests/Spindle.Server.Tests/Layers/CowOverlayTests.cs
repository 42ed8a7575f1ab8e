using System.Security.Cryptography;
using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Storage.Layers;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests.Layers;

/// <summary>The copy-on-write overlay against a model of what it must read back, on a base that must not change.</summary>
public sealed class CowOverlayTests
{
    private const int Size = 1024 * 1024 + 1000; // not a whole number of map blocks: the last one is short

    [Fact]
    public async Task Random_writes_zeroes_and_trims_read_back_as_the_model_and_never_touch_the_base()
    {
        using var directory = new TempDirectory();
        var content = Patterns.Random(Size, seed: 7);
        var baseDevice = new MemoryBlockDevice(Size);
        await baseDevice.WriteAsync(0, content, fua: false, CancellationToken.None);
        var before = await HashAsync(baseDevice);
        var model = (byte[])content.Clone();

        await using (var overlay = new CowOverlayDevice(baseDevice, directory.Path, ownsBase: false))
        {
            Assert.True(overlay.Features.HasFlag(BlockDeviceFeatures.Write));
            Assert.True(overlay.Features.HasFlag(BlockDeviceFeatures.SharedCache));
            Assert.Empty(Directory.GetFiles(directory.Path)); // unlinked at once
            var random = new Random(1234);
            for (var i = 0; i < 400; i++)
            {
                var offset = random.Next(Size);
                var length = random.Next(1, Math.Min(Size - offset, 20000) + 1);
                switch (random.Next(4))
                {
                    case 0:
                    case 1:
                        var data = Patterns.Random(length, seed: i);
                        await overlay.WriteAsync(offset, data, fua: false, CancellationToken.None);
                        data.CopyTo(model.AsSpan(offset));
                        break;
                    case 2:
                        await overlay.TrimAsync(offset, length, fua: false, CancellationToken.None);
                        model.AsSpan(offset, length).Clear();
                        break;
                    default:
                        await overlay.WriteZeroesAsync(offset, length, ZeroFlags.None, CancellationToken.None);
                        model.AsSpan(offset, length).Clear();
                        break;
                }

                if (i % 50 == 0)
                {
                    Assert.Equal(model, await ReadAllAsync(overlay));
                }
            }

            Assert.Equal(model, await ReadAllAsync(overlay));

            // base:allocation of the combination: every byte described once, zeroed runs read as zeroes.
            var extents = new ExtentList(100000);
            await overlay.GetExtentsAsync(0, Size, extents, CancellationToken.None);
            Assert.Equal(Size, extents.TotalLength);
            var position = 0L;
            foreach (var extent in extents.Items)
            {
                if (extent.Flags.HasFlag(AllocationFlags.Zero))
                {
                    Assert.All(model.AsSpan((int)position, (int)extent.Length).ToArray(), b => Assert.Equal(0, b));
                }

                position += extent.Length;
            }
        }

        Assert.Equal(before, await HashAsync(baseDevice));
        Assert.Empty(Directory.GetFiles(directory.Path));
        await baseDevice.DisposeAsync();
    }

    /// <summary>
    /// The connection thread's paths, used as the server uses them (try at once, else the asynchronous path): they
    /// agree with the model, take what they can (whole blocks, blocks already in the overlay, cached reads) and refuse
    /// a write that would need a block copied up from the base.
    /// </summary>
    [Fact]
    public async Task Immediate_reads_and_writes_agree_with_the_model_and_refuse_a_copy_up()
    {
        using var directory = new TempDirectory();
        var content = Patterns.Random(Size, seed: 9);
        var baseDevice = new MemoryBlockDevice(Size);
        await baseDevice.WriteAsync(0, content, fua: false, CancellationToken.None);
        var model = (byte[])content.Clone();
        await using (var overlay = new CowOverlayDevice(baseDevice, directory.Path, ownsBase: false))
        {
            // Part of a block still in the base needs the rest of it copied up: not at once.
            Assert.False(overlay.TryWriteImmediate(overlay.BlockSize + 10, new byte[100]));
            var (writesAtOnce, writesRefused, readsAtOnce) = (0, 0, 0);
            var random = new Random(4321);
            for (var i = 0; i < 400; i++)
            {
                var offset = random.Next(4) == 0 ? random.Next(Size / overlay.BlockSize) * overlay.BlockSize : random.Next(Size);
                var length = random.Next(4) == 0 ? Math.Min(Size - offset, overlay.BlockSize * random.Next(1, 4)) : random.Next(1, Math.Min(Size - offset, 20000) + 1);
                switch (random.Next(5))
                {
                    case 0:
                    case 1:
                        var data = Patterns.Random(length, seed: i);
                        if (overlay.TryWriteImmediate(offset, data))
                        {
                            writesAtOnce++;
                        }
                        else
                        {
                            writesRefused++;
                            await overlay.WriteAsync(offset, data, fua: false, CancellationToken.None);
                        }

                        data.CopyTo(model.AsSpan(offset));
                        break;
                    case 2:
                        await overlay.WriteZeroesAsync(offset, length, ZeroFlags.None, CancellationToken.None);
                        model.AsSpan(offset, length).Clear();
                        break;
                    default:
                        var buffer = new byte[length];
                        if (overlay.TryReadImmediate(offset, buffer))
                        {
                            readsAtOnce++;
                            Assert.Equal(model.AsSpan(offset, length).ToArray(), buffer);
                        }

                        break;
                }
            }

            Assert.Equal(model, await ReadAllAsync(overlay));
            Assert.True(writesAtOnce > 0 && writesRefused > 0 && readsAtOnce > 0, $"at once {writesAtOnce}, refused {writesRefused}, reads {readsAtOnce}");
        }

        Assert.Equal(content, await ReadAllAsync(baseDevice));
        await baseDevice.DisposeAsync();
    }

    [Fact]
    public async Task Per_connection_overlays_do_not_see_each_other()
    {
        using var directory = new TempDirectory();
        var baseDevice = new MemoryBlockDevice(64 * 1024, readOnly: true);
        await using var template = new PerConnectionCowDevice(baseDevice, directory.Path, ownsBase: true);
        Assert.False(template.Features.HasFlag(BlockDeviceFeatures.SharedCache)); // never multi-conn
        Assert.True(template.Features.HasFlag(BlockDeviceFeatures.Write));
        await using var first = await template.OpenConnectionAsync(CancellationToken.None);
        await using var second = await template.OpenConnectionAsync(CancellationToken.None);
        Assert.NotSame(first, second);
        await first.WriteAsync(100, new byte[] { 1, 2, 3 }, fua: false, CancellationToken.None);
        var buffer = new byte[3];
        await second.ReadAsync(100, buffer, CancellationToken.None);
        Assert.Equal(new byte[3], buffer);
        await first.ReadAsync(100, buffer, CancellationToken.None);
        Assert.Equal(new byte[] { 1, 2, 3 }, buffer);
        await Assert.ThrowsAsync<BlockDeviceException>(async () => await template.WriteAsync(0, new byte[1], fua: false, CancellationToken.None));
    }

    [Fact]
    public void Map_blocks_grow_with_the_base_so_the_map_stays_bounded()
    {
        Assert.Equal(12, CowOverlayDevice.BlockShiftFor(1L << 30));
        Assert.Equal(16, CowOverlayDevice.BlockShiftFor(1L << 40));
        Assert.True((1L << 50) >> CowOverlayDevice.BlockShiftFor(1L << 50) <= CowOverlayDevice.MaxMapEntries);
    }

    private static async Task<byte[]> ReadAllAsync(BlockDevice device)
    {
        var all = new byte[device.Size];
        await device.ReadAsync(0, all, CancellationToken.None);
        return all;
    }

    private static async Task<string> HashAsync(BlockDevice device) => Convert.ToHexString(SHA256.HashData(await ReadAllAsync(device)));
}
