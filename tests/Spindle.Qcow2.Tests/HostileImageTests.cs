using System.Buffers.Binary;
using Spindle.Storage;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>
/// qemu-made images mutated deterministically (bytes of the header, L1, L2, refcount table and blocks, snapshot table,
/// bitmap directory, or anywhere; truncation) must be refused at open with a clear error or answer requests with an
/// error: never another exception, a hang or a crash. Every open and request runs under a timeout.
/// </summary>
public sealed class HostileImageTests
{
    private static readonly TimeSpan Limit = TimeSpan.FromSeconds(20);

    public static TheoryData<string, int> Cases()
    {
        var data = new TheoryData<string, int>();
        foreach (var kind in new[] { "v3", "v2", "extended", "compressed", "snapshot-bitmap", "small-clusters" })
        {
            data.Add(kind, 60);
        }

        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task Mutated_images_are_refused_or_fail_requests_cleanly(string kind, int mutations)
    {
        using var directory = new TempDirectory();
        var original = await MakeImage(directory, kind);
        var bytes = await File.ReadAllBytesAsync(original);
        var regions = FindRegions(bytes);
        var outcomes = new Dictionary<string, int>();
        for (var seed = 0; seed < mutations; seed++)
        {
            var random = new Random((kind.GetHashCode(StringComparison.Ordinal) & 0xFFFF) * 1000 + seed);
            var mutated = Mutate(bytes, regions, random, out var description);
            var path = directory.File($"m{seed}.qcow2");
            await File.WriteAllBytesAsync(path, mutated);
            var outcome = await Exercise(path, writable: seed % 3 == 0).WaitAsync(Limit);
            if (outcome.StartsWith("unexpected", StringComparison.Ordinal))
            {
                Assert.Fail($"{kind} seed {seed} ({description}): {outcome}");
            }

            outcomes[outcome.Split(':')[0]] = outcomes.GetValueOrDefault(outcome.Split(':')[0]) + 1;
            File.Delete(path);
        }

        Assert.True(outcomes.Count > 1, $"every mutation ended the same way: {string.Join(", ", outcomes)}");
    }

    /// <summary>Opens and reads everything (and for some, writes); returns how it ended, or "unexpected: ..." for a bug.</summary>
    private static Task<string> Exercise(string path, bool writable) => Task.Run(async () =>
    {
        Qcow2Image device;
        try
        {
            device = Qcow2Image.Open(path, new Qcow2OpenOptions { ReadOnly = !writable, OpenBackingChain = false });
        }
        catch (Qcow2FormatException exception)
        {
            return $"refused: {exception.Message}";
        }
        catch (BlockDeviceException exception)
        {
            return $"open-io: {exception.Message}";
        }
        catch (Exception exception)
        {
            return $"unexpected at open: {exception}";
        }

        var errors = 0;
        try
        {
            var buffer = new byte[1 << 20];
            var size = Math.Min(device.Size, 64L << 20);
            for (long offset = 0; offset < size; offset += buffer.Length)
            {
                errors += await Expect(() => device.ReadAsync(offset, buffer.AsMemory(0, (int)Math.Min(buffer.Length, size - offset)), CancellationToken.None));
            }

            var extents = new ExtentList(4096);
            errors += await Expect(() => device.GetExtentsAsync(0, size, extents, CancellationToken.None));
            foreach (var context in device.MetaContexts)
            {
                extents.Clear(4096);
                errors += await Expect(() => context.GetStatusAsync(0, size, extents, CancellationToken.None));
            }

            if (writable)
            {
                var random = new Random(1);
                for (var i = 0; i < 20 && size > 70_000; i++)
                {
                    var offset = (long)(random.NextDouble() * (size - 70_000));
                    errors += await Expect(() => device.WriteAsync(offset, new byte[random.Next(1, 70_000)], fua: false, CancellationToken.None));
                    errors += await Expect(() => device.WriteZeroesAsync(offset, 65536, ZeroFlags.None, CancellationToken.None));
                    errors += await Expect(() => device.TrimAsync(offset, 131072, fua: false, CancellationToken.None));
                }

                errors += await Expect(() => device.FlushAsync(CancellationToken.None));
            }
        }
        catch (Exception exception)
        {
            return $"unexpected in a request: {exception}";
        }
        finally
        {
            try
            {
                await device.DisposeAsync();
            }
            catch (BlockDeviceException)
            {
                errors++;
            }
        }

        return errors > 0 ? "eio: requests failed" : "served: no error";
    });

    private static async Task<int> Expect(Func<ValueTask> operation)
    {
        try
        {
            await operation();
            return 0;
        }
        catch (BlockDeviceException)
        {
            return 1;
        }
    }

    private static async Task<string> MakeImage(TempDirectory directory, string kind)
    {
        var options = kind switch
        {
            "v2" => "compat=0.10,cluster_size=4096",
            "extended" => "compat=1.1,cluster_size=65536,extended_l2=on",
            "small-clusters" => "compat=1.1,cluster_size=512,refcount_bits=2",
            _ => "compat=1.1,cluster_size=65536",
        };
        var image = await Qemu.Create(directory, "original.qcow2", options, 16L << 20);
        await Qemu.Io(image, "qcow2", "write -P 0x11 0 1M", "write -P 0x22 5M 200k", "write -z 7M 128k", "write -P 0x33 15M 64k");
        if (kind == "compressed")
        {
            var compressed = directory.File("compressed.qcow2");
            await Qemu.Img("convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", image, compressed);
            return compressed;
        }

        if (kind == "snapshot-bitmap")
        {
            await Qemu.Img("snapshot", "-c", "s1", image);
            await Qemu.Io(image, "qcow2", "write -P 0x44 512k 1M");
            await Qemu.Img("bitmap", "--add", image, "b1");
        }

        return image;
    }

    /// <summary>Where the metadata lies: (name, offset, length) from the header's pointers.</summary>
    private static List<(string Name, long Offset, int Length)> FindRegions(byte[] image)
    {
        var clusterSize = 1 << (int)BinaryPrimitives.ReadUInt32BigEndian(image.AsSpan(20));
        var regions = new List<(string, long, int)> { ("header", 0, Math.Min(clusterSize, 512)) };
        var l1 = (long)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(40));
        var l1Size = (int)BinaryPrimitives.ReadUInt32BigEndian(image.AsSpan(36));
        regions.Add(("l1", l1, Math.Max(8, l1Size * 8)));
        var firstL2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan((int)l1)) & 0x00FF_FFFF_FFFF_FE00);
        if (firstL2 != 0 && firstL2 < image.Length)
        {
            regions.Add(("l2", firstL2, (int)Math.Min(clusterSize, image.Length - firstL2)));
        }

        var reftable = (long)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(48));
        regions.Add(("reftable", reftable, 64));
        var refblock = (long)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan((int)reftable));
        if (refblock != 0 && refblock < image.Length)
        {
            regions.Add(("refblock", refblock, (int)Math.Min(clusterSize, image.Length - refblock)));
        }

        var snapshots = (long)BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan(64));
        if (snapshots != 0 && snapshots < image.Length)
        {
            regions.Add(("snapshots", snapshots, 128));
        }

        return regions;
    }

    private static byte[] Mutate(byte[] original, List<(string Name, long Offset, int Length)> regions, Random random, out string description)
    {
        var image = (byte[])original.Clone();
        if (random.Next(12) == 0)
        {
            var length = random.Next(72, image.Length);
            description = $"truncated to {length}";
            return image[..length];
        }

        var (name, offset, regionLength) = random.Next(8) == 0 ? ("anywhere", 0L, image.Length) : regions[random.Next(regions.Count)];
        var count = random.Next(1, 6);
        var changes = new List<string>();
        for (var i = 0; i < count; i++)
        {
            var at = offset + random.Next(Math.Max(1, Math.Min(regionLength, image.Length - (int)offset)));
            if (at >= image.Length)
            {
                continue;
            }

            image[at] = random.Next(4) switch
            {
                0 => (byte)(image[at] ^ (1 << random.Next(8))),
                1 => 0xFF,
                2 => 0x00,
                _ => (byte)random.Next(256),
            };
            changes.Add($"{at}");
        }

        description = $"{name} bytes at {string.Join(",", changes)}";
        return image;
    }
}
