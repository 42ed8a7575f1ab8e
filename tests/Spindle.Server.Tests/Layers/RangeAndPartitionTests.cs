using System.Buffers.Binary;
using Spindle.Cli.Hosting;
using Spindle.Storage;
using Spindle.Storage.Layers;
using Xunit;

namespace Spindle.Server.Tests.Layers;

/// <summary>Windows onto part of a device, and the partition tables that place them; hostile tables are refused.</summary>
public sealed class RangeAndPartitionTests
{
    [Fact]
    public async Task A_range_shifts_every_operation_and_stays_inside_its_window()
    {
        var disk = new MemoryBlockDevice(1024 * 1024);
        await using var range = new RangeDevice(disk, 4096, 8192, ownsInner: true);
        Assert.Equal(8192, range.Size);
        await range.WriteAsync(0, new byte[] { 9, 8, 7 }, fua: false, CancellationToken.None);
        await range.WriteZeroesAsync(100, 10, ZeroFlags.None, CancellationToken.None);
        var check = new byte[3];
        await disk.ReadAsync(4096, check, CancellationToken.None);
        Assert.Equal(new byte[] { 9, 8, 7 }, check);
        Assert.Throws<ArgumentOutOfRangeException>(() => new RangeDevice(new MemoryBlockDevice(4096), 4000, 200, ownsInner: false));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RangeDevice(new MemoryBlockDevice(4096), -1, 200, ownsInner: false));
    }

    [Fact]
    public async Task Mbr_primary_partitions_are_found()
    {
        var disk = new MemoryBlockDevice(4 * 1024 * 1024);
        var sector = new byte[512];
        sector[510] = 0x55;
        sector[511] = 0xAA;
        Slot(sector, 0, 0x83, 2048, 2048);
        Slot(sector, 1, 0x83, 4096, 100);
        await disk.WriteAsync(0, sector, fua: false, CancellationToken.None);
        Assert.Equal(new PartitionEntry(2, 4096 * 512, 100 * 512), await PartitionTable.FindAsync(disk, 2, CancellationToken.None));
        var empty = await Assert.ThrowsAsync<InvalidDataException>(async () => await PartitionTable.FindAsync(disk, 3, CancellationToken.None));
        Assert.Contains("empty", empty.Message, StringComparison.Ordinal);
        await Assert.ThrowsAsync<InvalidDataException>(async () => await PartitionTable.FindAsync(disk, 5, CancellationToken.None));

        // A partition running past the end of the disk is refused, not served short.
        Slot(sector, 2, 0x83, 8000, 1000);
        await disk.WriteAsync(0, sector, fua: false, CancellationToken.None);
        var past = await Assert.ThrowsAsync<InvalidDataException>(async () => await PartitionTable.FindAsync(disk, 3, CancellationToken.None));
        Assert.Contains("past the end", past.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Hostile_gpt_headers_are_refused_before_anything_is_buffered()
    {
        var header = new byte[512];
        "EFI PART"u8.CopyTo(header);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(12), 92);
        BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(72), 2);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(80), 128);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(84), 128);
        Assert.True(PartitionTable.TryParseGptHeader(header, out var parsed, out _));
        Assert.Equal(new PartitionTable.GptHeader(2, 128, 128), parsed);

        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(80), uint.MaxValue);
        Assert.False(PartitionTable.TryParseGptHeader(header, out _, out var problem));
        Assert.Contains("larger than", problem, StringComparison.Ordinal);

        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(80), 128);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(84), 100);
        Assert.False(PartitionTable.TryParseGptHeader(header, out _, out _));

        var entry = new byte[128];
        entry[0] = 1;
        BinaryPrimitives.WriteUInt64LittleEndian(entry.AsSpan(32), 100);
        BinaryPrimitives.WriteUInt64LittleEndian(entry.AsSpan(40), 50); // ends before it starts
        Assert.False(PartitionTable.TryParseGptEntry(entry, out _, out _));
    }

    [Theory]
    [InlineData("[d]\nexportname = /x\ncopyonwrite = true\ncowdir = /tmp\n", CowMode.PerConnection)]
    [InlineData("[d]\nexportname = /x\ncow = true\n", CowMode.Shared)]
    [InlineData("[d]\nexportname = /x\nsparse_cow = true\n", CowMode.None)]
    public void Copy_on_write_keys_are_read(string text, CowMode mode)
    {
        var configuration = IniConfigurationReader.Parse(text);
        Assert.Equal(mode, configuration.Exports[0].Layers.Cow);
    }

    [Fact]
    public void Range_keys_are_read_and_refused_on_directories()
    {
        var configuration = IniConfigurationReader.Parse("[d]\nexportname = /x\noffset = 1M\nlength = 2M\n[e]\nexportname = /y\npartition = 2\n");
        Assert.Equal(1024 * 1024, configuration.Exports[0].Layers.Offset);
        Assert.Equal(2 * 1024 * 1024, configuration.Exports[0].Layers.Length);
        Assert.Equal(2, configuration.Exports[1].Layers.Partition);
        Assert.Throws<ConfigurationException>(() => IniConfigurationReader.Parse("[d]\nbackend = directory\npath = /srv\ncopyonwrite = true\n"));
    }

    private static void Slot(byte[] sector, int index, byte type, uint first, uint count)
    {
        var slot = sector.AsSpan(446 + (16 * index), 16);
        slot[4] = type;
        BinaryPrimitives.WriteUInt32LittleEndian(slot[8..], first);
        BinaryPrimitives.WriteUInt32LittleEndian(slot[12..], count);
    }
}
