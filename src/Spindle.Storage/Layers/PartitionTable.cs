using System.Buffers.Binary;

namespace Spindle.Storage.Layers;

/// <summary>One partition: its number as tools show it (1-based) and where its bytes are on the disk.</summary>
public readonly record struct PartitionEntry(int Number, long Offset, long Length);

/// <summary>
/// Finds a partition on a disk image with an MBR or a GPT (UEFI 2.10 §5.2 and §5.3), for <c>--partition N</c>. Only
/// 512-byte logical sectors (what sgdisk, parted and fdisk write to an image file) and primary MBR partitions (1–4)
/// are understood; anything else is reported as such, never guessed at.
/// </summary>
public static class PartitionTable
{
    /// <summary>The logical sector size the tables are read with.</summary>
    public const int SectorSize = 512;

    /// <summary>The largest partition entry array read (128 entries of 128 bytes is the usual 16 KiB).</summary>
    public const int MaxEntryArrayBytes = 1 << 20;

    private const byte ProtectiveMbrType = 0xEE;

    /// <summary>Reads the disk's partition table and returns partition <paramref name="number"/>.</summary>
    /// <exception cref="InvalidDataException">There is no such partition, no table, or a table that does not add up.</exception>
    public static async ValueTask<PartitionEntry> FindAsync(BlockDevice disk, int number, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(disk);
        if (number < 1)
        {
            throw new InvalidDataException($"partition numbers start at 1, not {number}");
        }

        if (disk.Size < 2 * SectorSize)
        {
            throw new InvalidDataException($"{disk.Description} is too small to hold a partition table");
        }

        var sector = new byte[SectorSize];
        await disk.ReadAsync(0, sector, cancellationToken).ConfigureAwait(false);
        if (!TryParseMbr(sector, out var mbr))
        {
            throw new InvalidDataException($"{disk.Description} has no partition table (no 55 AA signature in sector 0)");
        }

        PartitionEntry entry;
        if (mbr.Any(e => e.Type == ProtectiveMbrType))
        {
            entry = await FindGptAsync(disk, number, cancellationToken).ConfigureAwait(false);
        }
        else
        {
            if (number > 4)
            {
                throw new InvalidDataException($"partition {number}: only the four primary MBR partitions are supported (logical partitions are not)");
            }

            var slot = mbr[number - 1];
            if (slot.Type == 0 || slot.SectorCount == 0)
            {
                throw new InvalidDataException($"MBR partition {number} is empty");
            }

            entry = new PartitionEntry(number, slot.FirstSector * SectorSize, slot.SectorCount * SectorSize);
        }

        if (entry.Offset + entry.Length > disk.Size)
        {
            throw new InvalidDataException($"partition {number} (bytes {entry.Offset} to {entry.Offset + entry.Length}) runs past the end of the disk ({disk.Size} bytes)");
        }

        return entry;
    }

    /// <summary>One of the MBR's four primary slots.</summary>
    public readonly record struct MbrSlot(byte Type, long FirstSector, long SectorCount);

    /// <summary>
    /// Parses the MBR in sector 0.
    /// <code>
    /// 0     446   boot code
    /// 446    16   slot 1: status(1) CHS first(3) type(1) CHS last(3) LBA first(4, LE) sector count(4, LE)
    /// 462    16   slot 2     478  16  slot 3     494  16  slot 4
    /// 510     2   signature 55 AA
    /// </code>
    /// </summary>
    public static bool TryParseMbr(ReadOnlySpan<byte> sector, out MbrSlot[] slots)
    {
        slots = [];
        if (sector.Length < SectorSize || sector[510] != 0x55 || sector[511] != 0xAA)
        {
            return false;
        }

        slots = new MbrSlot[4];
        for (var i = 0; i < 4; i++)
        {
            var slot = sector.Slice(446 + (16 * i), 16);
            slots[i] = new MbrSlot(slot[4], BinaryPrimitives.ReadUInt32LittleEndian(slot[8..]), BinaryPrimitives.ReadUInt32LittleEndian(slot[12..]));
        }

        return true;
    }

    /// <summary>The fields of a GPT header this reader uses.</summary>
    public readonly record struct GptHeader(long EntriesLba, int EntryCount, int EntrySize);

    /// <summary>
    /// Parses the GPT header in sector 1.
    /// <code>
    /// 0    8  "EFI PART"            8   4  revision         12  4  header size (92..sector)
    /// 16   4  header CRC32          20  4  reserved          24  8  this LBA
    /// 32   8  alternate LBA         40  8  first usable LBA  48  8  last usable LBA
    /// 56  16  disk GUID             72  8  entry array LBA   80  4  entry count
    /// 84   4  entry size (128 * 2^n) 88 4  entry array CRC32
    /// </code>
    /// The entry array's size is checked against <see cref="MaxEntryArrayBytes"/> before anything is read.
    /// </summary>
    public static bool TryParseGptHeader(ReadOnlySpan<byte> sector, out GptHeader header, out string? problem)
    {
        header = default;
        problem = null;
        if (sector.Length < SectorSize || !sector[..8].SequenceEqual("EFI PART"u8))
        {
            problem = "no GPT header in sector 1 (the MBR is a protective one)";
            return false;
        }

        var headerSize = BinaryPrimitives.ReadUInt32LittleEndian(sector[12..]);
        var entriesLba = BinaryPrimitives.ReadUInt64LittleEndian(sector[72..]);
        var count = BinaryPrimitives.ReadUInt32LittleEndian(sector[80..]);
        var size = BinaryPrimitives.ReadUInt32LittleEndian(sector[84..]);
        if (headerSize < 92 || headerSize > SectorSize)
        {
            problem = $"GPT header size {headerSize} is not between 92 and {SectorSize}";
            return false;
        }

        if (size < 128 || size > 4096 || (size & (size - 1)) != 0)
        {
            problem = $"GPT entry size {size} is not 128 times a power of 2";
            return false;
        }

        if (count == 0 || (ulong)count * size > MaxEntryArrayBytes)
        {
            problem = $"GPT entry array of {count} entries of {size} bytes is empty or larger than {MaxEntryArrayBytes} bytes";
            return false;
        }

        if (entriesLba < 2 || entriesLba > long.MaxValue / SectorSize)
        {
            problem = $"GPT entry array at LBA {entriesLba} is not after the header";
            return false;
        }

        header = new GptHeader((long)entriesLba, (int)count, (int)size);
        return true;
    }

    /// <summary>
    /// Parses one GPT partition entry.
    /// <code>
    /// 0  16  type GUID (all zero: unused)   16  16  unique GUID
    /// 32  8  first LBA                        40   8  last LBA (inclusive)
    /// 48  8  attributes                       56  72  name (UTF-16LE)
    /// </code>
    /// </summary>
    public static bool TryParseGptEntry(ReadOnlySpan<byte> entry, out long firstLba, out long lastLba)
    {
        firstLba = 0;
        lastLba = 0;
        if (entry.Length < 128 || !entry[..16].ContainsAnyExcept((byte)0))
        {
            return false;
        }

        var first = BinaryPrimitives.ReadUInt64LittleEndian(entry[32..]);
        var last = BinaryPrimitives.ReadUInt64LittleEndian(entry[40..]);
        if (last < first || last >= long.MaxValue / SectorSize)
        {
            return false;
        }

        firstLba = (long)first;
        lastLba = (long)last;
        return true;
    }

    private static async ValueTask<PartitionEntry> FindGptAsync(BlockDevice disk, int number, CancellationToken cancellationToken)
    {
        var sector = new byte[SectorSize];
        await disk.ReadAsync(SectorSize, sector, cancellationToken).ConfigureAwait(false);
        if (!TryParseGptHeader(sector, out var header, out var problem))
        {
            throw new InvalidDataException($"{disk.Description}: {problem}");
        }

        if (number > header.EntryCount)
        {
            throw new InvalidDataException($"GPT partition {number}: the table has {header.EntryCount} entries");
        }

        var entryOffset = (header.EntriesLba * SectorSize) + ((long)(number - 1) * header.EntrySize);
        if (entryOffset + header.EntrySize > disk.Size)
        {
            throw new InvalidDataException($"GPT partition {number}: its entry lies past the end of the disk");
        }

        var entry = new byte[header.EntrySize];
        await disk.ReadAsync(entryOffset, entry, cancellationToken).ConfigureAwait(false);
        if (!TryParseGptEntry(entry, out var first, out var last))
        {
            throw new InvalidDataException($"GPT partition {number} is unused or invalid");
        }

        return new PartitionEntry(number, first * SectorSize, (last - first + 1) * SectorSize);
    }
}
