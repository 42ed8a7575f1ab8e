using System.Buffers.Binary;
using System.Text;

namespace Spindle.Storage.Layers;

/// <summary>
/// The first page of a bitmap file (docs/bitmaps.md), all integers little-endian:
/// <code>
///  0       8      12     16            24           32          40     44      46      48           112    4092    4096
///  +-------+------+------+-------------+------------+-----------+------+-------+-------+------------+ ... +-------+
///  | magic | vers | hdr  | granularity | image size | bit count | flags| name  | 0     | name bytes | 0s  | CRC32C|
///  |"SPNDLBMP"| 1 | 4096 | (bytes)     | (bytes)    |           | 0    | length|       | (64, UTF-8)|     | 0..4092
///  +-------+------+------+-------------+------------+-----------+------+-------+-------+------------+ ... +-------+
/// </code>
/// The body follows at byte 4096: <see cref="DirtyBitmapStore.PageCount"/> pages of bits, least significant first.
/// </summary>
public sealed record BitmapFileHeader(string Name, long Granularity, long ImageSize)
{
    /// <summary>The header's size, and where the body starts.</summary>
    public const int Size = DirtyBitmapStore.PageSize;

    /// <summary>The only version written and read.</summary>
    public const uint CurrentVersion = 1;

    private const int ChecksumOffset = Size - 4;

    private const int NameOffset = 48;

    private const int MaxNameBytes = 64;

    private static ReadOnlySpan<byte> Magic => "SPNDLBMP"u8;

    /// <summary>Bits of the bitmap: the image size divided by the granularity, rounded up.</summary>
    public long BitCount => (ImageSize + Granularity - 1) / Granularity;

    /// <summary>Bytes of the body: whole pages.</summary>
    public long BodyBytes => (BitCount + (DirtyBitmapStore.PageSize * 8) - 1) / (DirtyBitmapStore.PageSize * 8) * DirtyBitmapStore.PageSize;

    /// <summary>Writes the header page into <paramref name="destination"/> (<see cref="Size"/> bytes).</summary>
    public void Write(Span<byte> destination)
    {
        destination = destination[..Size];
        destination.Clear();
        Magic.CopyTo(destination);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[8..], CurrentVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[12..], Size);
        BinaryPrimitives.WriteInt64LittleEndian(destination[16..], Granularity);
        BinaryPrimitives.WriteInt64LittleEndian(destination[24..], ImageSize);
        BinaryPrimitives.WriteInt64LittleEndian(destination[32..], BitCount);
        var nameLength = Encoding.UTF8.GetBytes(Name, destination.Slice(NameOffset, MaxNameBytes));
        BinaryPrimitives.WriteUInt16LittleEndian(destination[44..], (ushort)nameLength);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[ChecksumOffset..], Checksum(destination[..ChecksumOffset]));
    }

    /// <summary>
    /// Parses a header page. Every field is checked before it is believed: a hostile file gets a reason, never an
    /// exception or a huge allocation.
    /// </summary>
    public static bool TryParse(ReadOnlySpan<byte> source, out BitmapFileHeader? header, out string? problem)
    {
        header = null;
        if (source.Length < Size)
        {
            problem = $"shorter than its {Size}-byte header";
            return false;
        }

        if (!source.StartsWith(Magic))
        {
            problem = "not a Spindle bitmap file (bad magic)";
            return false;
        }

        if (BinaryPrimitives.ReadUInt32LittleEndian(source[ChecksumOffset..]) != Checksum(source[..ChecksumOffset]))
        {
            problem = "header checksum mismatch (the file is damaged)";
            return false;
        }

        var version = BinaryPrimitives.ReadUInt32LittleEndian(source[8..]);
        var headerSize = BinaryPrimitives.ReadUInt32LittleEndian(source[12..]);
        var granularity = BinaryPrimitives.ReadInt64LittleEndian(source[16..]);
        var imageSize = BinaryPrimitives.ReadInt64LittleEndian(source[24..]);
        var bitCount = BinaryPrimitives.ReadInt64LittleEndian(source[32..]);
        var flags = BinaryPrimitives.ReadUInt32LittleEndian(source[40..]);
        var nameLength = BinaryPrimitives.ReadUInt16LittleEndian(source[44..]);
        problem = version != CurrentVersion ? $"version {version} (this spindle reads version {CurrentVersion})"
            : headerSize != Size ? $"header size {headerSize} (expected {Size})"
            : flags != 0 ? $"unknown flags 0x{flags:x}"
            : !DirtyBitmapStore.IsValidGranularity(granularity) ? $"granularity {granularity} is not a power of two from 512 bytes to 1 GiB"
            : imageSize is < 0 or > long.MaxValue / 2 ? $"image size {imageSize} is out of range"
            : (imageSize + granularity - 1) / granularity != bitCount ? $"bit count {bitCount} does not match the image size and granularity"
            : nameLength is 0 or > MaxNameBytes ? $"name length {nameLength}"
            : null;
        if (problem is not null)
        {
            return false;
        }

        string name;
        try
        {
            name = new UTF8Encoding(false, true).GetString(source.Slice(NameOffset, nameLength));
        }
        catch (DecoderFallbackException)
        {
            problem = "the name is not UTF-8";
            return false;
        }

        if (!DirtyBitmapStore.IsValidName(name))
        {
            problem = $"invalid bitmap name '{name}'";
            return false;
        }

        header = new BitmapFileHeader(name, granularity, imageSize);
        if (header.BodyBytes > DirtyBitmap.MaxBodyBytes)
        {
            header = null;
            problem = $"{bitCount} bits is more than the 1 GiB of bitmap spindle keeps";
            return false;
        }

        return true;
    }

    /// <summary>CRC-32C of the header bytes before the checksum field.</summary>
    private static uint Checksum(ReadOnlySpan<byte> bytes)
    {
        var crc = 0xFFFFFFFFu;
        var i = 0;
        for (; i + 8 <= bytes.Length; i += 8)
        {
            crc = System.Numerics.BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(bytes[i..]));
        }

        for (; i < bytes.Length; i++)
        {
            crc = System.Numerics.BitOperations.Crc32C(crc, bytes[i]);
        }

        return ~crc;
    }
}
