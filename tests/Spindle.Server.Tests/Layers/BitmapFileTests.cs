using System.Buffers.Binary;
using Spindle.Storage;
using Spindle.Storage.Layers;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests.Layers;

/// <summary>Bitmap files: what a server marks is there after it stops, a held file is locked, a hostile one refused.</summary>
public sealed class BitmapFileTests
{
    private const long Granularity = 64 * 1024;
    private const long ImageSize = (300L * 1024 * 1024) + 4096; // 4801 bits: a partial last word and page

    [Fact]
    public async Task Marked_ranges_survive_close_and_reopen_and_the_file_is_locked_while_open()
    {
        using var directory = new TempDirectory();
        var path = directory.File("disk.img.b.spindle-bitmap");
        var device = new DirtyBitmapDevice(new NullBlockDevice(ImageSize), [new DirtyBitmap(FileBitmapStore.Create(path, "b", Granularity, ImageSize))], ownsInner: true);
        await device.WriteAsync(0, new byte[1], fua: false, CancellationToken.None);
        await device.WriteZeroesAsync(100 * Granularity, 3 * Granularity, ZeroFlags.None, CancellationToken.None);
        await device.TrimAsync(ImageSize - 10, 10, fua: false, CancellationToken.None);

        // Held: a second opener is refused, a reader sees it in use and sees every bit already.
        Assert.Throws<BitmapInUseException>(() => FileBitmapStore.Open(path));
        Assert.Throws<BitmapInUseException>(() => FileBitmapStore.Remove(path));
        using (var reader = new DirtyBitmap(FileBitmapStore.Open(path, writable: false)))
        {
            Assert.True(((FileBitmapStore)reader.Store).InUse);
            Assert.Equal((4 * Granularity) + (ImageSize - (4800 * Granularity)), reader.DirtyBytes);
        }

        await device.DisposeAsync();
        using (var reopened = new DirtyBitmap(FileBitmapStore.Open(path)))
        {
            Assert.True(reopened.IsDirtyBit(0));
            Assert.False(reopened.IsDirtyBit(1));
            Assert.True(reopened.IsDirtyBit(100) && reopened.IsDirtyBit(102));
            Assert.False(reopened.IsDirtyBit(103));
            Assert.True(reopened.IsDirtyBit(4800));
            ((FileBitmapStore)reopened.Store).Clear();
            Assert.True(reopened.IsDirtyBit(0)); // memory keeps its copy; the file is clean
        }

        using (var cleared = new DirtyBitmap(FileBitmapStore.Open(path)))
        {
            Assert.Equal(0, cleared.DirtyBytes);
        }

        FileBitmapStore.Remove(path);
        Assert.False(File.Exists(path));
        Assert.Empty(Directory.GetFiles(directory.Path)); // no temporary left behind
    }

    [Theory]
    [InlineData("magic")]
    [InlineData("checksum")]
    [InlineData("version")]
    [InlineData("granularity")]
    [InlineData("bitcount")]
    [InlineData("name")]
    [InlineData("huge")]
    [InlineData("truncated")]
    [InlineData("empty")]
    public void A_hostile_bitmap_file_is_refused_with_a_reason(string damage)
    {
        using var directory = new TempDirectory();
        var path = directory.File("x.spindle-bitmap");
        FileBitmapStore.Create(path, "x", Granularity, ImageSize).Dispose();
        var bytes = File.ReadAllBytes(path);
        switch (damage)
        {
            case "magic":
                bytes[0] ^= 0xFF;
                break;
            case "checksum":
                bytes[20] ^= 1;
                break;
            case "version":
                Rewrite(bytes, h => BinaryPrimitives.WriteUInt32LittleEndian(h[8..], 7));
                break;
            case "granularity":
                Rewrite(bytes, h => BinaryPrimitives.WriteInt64LittleEndian(h[16..], 1000));
                break;
            case "bitcount":
                Rewrite(bytes, h => BinaryPrimitives.WriteInt64LittleEndian(h[32..], 5));
                break;
            case "name":
                Rewrite(bytes, h => h[48] = (byte)'/');
                break;
            case "huge":
                // Consistent fields describing 2^40 bits: refused before any allocation.
                Rewrite(bytes, h =>
                {
                    BinaryPrimitives.WriteInt64LittleEndian(h[16..], 512);
                    BinaryPrimitives.WriteInt64LittleEndian(h[24..], 1L << 49);
                    BinaryPrimitives.WriteInt64LittleEndian(h[32..], 1L << 40);
                });
                break;
            case "truncated":
                bytes = bytes[..(BitmapFileHeader.Size + 100)];
                break;
            default:
                bytes = [];
                break;
        }

        File.WriteAllBytes(path, bytes);
        var error = Assert.Throws<InvalidDataException>(() => new DirtyBitmap(FileBitmapStore.Open(path)));
        Assert.Contains(path, error.Message, StringComparison.Ordinal);
        FileBitmapStore.Remove(path); // a damaged bitmap can still be removed
    }

    [Fact]
    public void Random_header_damage_never_escapes_as_anything_but_a_refusal()
    {
        var header = new byte[BitmapFileHeader.Size];
        new BitmapFileHeader("fuzz", Granularity, ImageSize).Write(header);
        var random = new Random(99);
        var accepted = 0;
        for (var i = 0; i < 5000; i++)
        {
            var copy = (byte[])header.Clone();
            for (var flips = random.Next(1, 6); flips > 0; flips--)
            {
                copy[random.Next(random.Next(2) == 0 ? 64 : copy.Length)] = (byte)random.Next(256);
            }

            if (i % 2 == 0)
            {
                // Re-seal the checksum so the field checks themselves are exercised.
                BinaryPrimitives.WriteUInt32LittleEndian(copy.AsSpan(BitmapFileHeader.Size - 4), 0);
                var sealedCopy = copy;
                Rewrite(sealedCopy, _ => { });
                copy = sealedCopy;
            }

            if (BitmapFileHeader.TryParse(copy, out var parsed, out var problem))
            {
                accepted++;
                Assert.True(DirtyBitmapStore.IsValidGranularity(parsed!.Granularity) && DirtyBitmapStore.IsValidName(parsed.Name));
                Assert.True(parsed.BodyBytes <= DirtyBitmap.MaxBodyBytes);
            }
            else
            {
                Assert.False(string.IsNullOrEmpty(problem));
            }
        }

        Assert.True(accepted < 5000);
    }

    /// <summary>Changes header fields and recomputes the checksum, as a careful attacker would.</summary>
    private static void Rewrite(byte[] file, Action<Span<byte>> change)
    {
        change(file.AsSpan(0, BitmapFileHeader.Size));
        var crc = 0xFFFFFFFFu;
        var i = 0;
        for (; i + 8 <= BitmapFileHeader.Size - 4; i += 8)
        {
            crc = System.Numerics.BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(file.AsSpan(i)));
        }

        for (; i < BitmapFileHeader.Size - 4; i++)
        {
            crc = System.Numerics.BitOperations.Crc32C(crc, file[i]);
        }

        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(BitmapFileHeader.Size - 4), ~crc);
    }
}
