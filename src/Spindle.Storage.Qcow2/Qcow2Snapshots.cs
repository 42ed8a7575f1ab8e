using System.Buffers.Binary;
using System.Text;

namespace Spindle.Storage.Qcow2;

/// <summary>An internal snapshot, as <c>qemu-img snapshot -l</c> lists it.</summary>
/// <param name="Id">The unique id string ("1", "2", ...).</param>
/// <param name="Name">The name given at creation.</param>
/// <param name="VirtualSize">The virtual disk size when the snapshot was taken.</param>
/// <param name="Date">When the snapshot was taken.</param>
/// <param name="VmClock">How long the guest had run when the snapshot was taken.</param>
/// <param name="VmStateSize">Bytes of saved VM state (0 for a disk-only snapshot).</param>
public sealed record Qcow2SnapshotInfo(string Id, string Name, long VirtualSize, DateTimeOffset Date, TimeSpan VmClock, long VmStateSize)
{
    internal long L1TableOffset { get; init; }

    internal int L1Size { get; init; }
}

/// <summary>Reads the snapshot table (qcow2.txt "Snapshots").</summary>
internal static class Qcow2Snapshots
{
    /// <summary>qemu's limits: at most 65536 snapshots and a 64 MiB table; extra data of at most 1 KiB.</summary>
    public const int MaximumCount = 65536;
    public const long MaximumTableBytes = 64L * 1024 * 1024;
    public const int MaximumExtraData = 1024;

    /// <summary>
    /// Parses the header's nb_snapshots entries at snapshots_offset, checking each against the file.
    /// </summary>
    /// <remarks>
    /// <code>
    ///  0                8         12       14         16       20        24             32         36          40
    /// +----------------+---------+--------+----------+--------+---------+--------------+----------+-----------+
    /// | l1_table_offset| l1_size | id_len | name_len | date_s | date_ns | vm_clock_ns  | vm_state | extra_len |
    /// +----------------+---------+--------+----------+--------+---------+--------------+----------+-----------+
    /// then extra data (bytes 40-47: 64-bit vm state size, 48-55: virtual disk size), id, name, padding to 8.
    /// </code>
    /// </remarks>
    public static List<Qcow2SnapshotInfo> Read(ImageFile file, Qcow2Header header, long imageSize, out long tableLength)
    {
        var list = new List<Qcow2SnapshotInfo>();
        tableLength = 0;
        if (header.SnapshotCount == 0)
        {
            return list;
        }

        if (header.SnapshotCount > MaximumCount)
        {
            throw new Qcow2FormatException($"{header.SnapshotCount} snapshots exceed qemu's limit of {MaximumCount}");
        }

        var offset = (long)header.SnapshotsOffset;
        if (header.SnapshotsOffset > long.MaxValue || offset == 0 || (offset & (header.ClusterSize - 1)) != 0 || offset >= file.Length)
        {
            throw new Qcow2FormatException($"snapshot table offset {header.SnapshotsOffset} is not a cluster-aligned offset inside the file");
        }

        // Entries are read one at a time (the fixed part, then the variable part), so a small table costs little and a
        // hostile count stops at the file's end or qemu's 64 MiB limit instead of allocating it up front.
        var limit = Math.Min(file.Length - offset, MaximumTableBytes);
        var position = 0L;
        var fixedPart = new byte[40];
        for (var i = 0; i < header.SnapshotCount; i++)
        {
            if (position + 40 > limit)
            {
                throw new Qcow2FormatException($"snapshot table entry {i} runs past the end of the file or qemu's 64 MiB limit");
            }

            file.Read(fixedPart, offset + position);
            var variableLength = (long)BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(36)) + BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(12)) + BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(14));
            if (variableLength > MaximumExtraData + (2 * ushort.MaxValue) || position + 40 + variableLength > limit)
            {
                throw new Qcow2FormatException($"snapshot table entry {i} runs past the end of the file");
            }

            var table = new byte[40 + variableLength];
            fixedPart.CopyTo(table, 0);
            file.Read(table.AsSpan(40), offset + position + 40);
            var entry = table.AsSpan();
            var l1Offset = BinaryPrimitives.ReadUInt64BigEndian(entry);
            var l1Size = BinaryPrimitives.ReadUInt32BigEndian(entry[8..]);
            int idLength = BinaryPrimitives.ReadUInt16BigEndian(entry[12..]);
            int nameLength = BinaryPrimitives.ReadUInt16BigEndian(entry[14..]);
            var seconds = BinaryPrimitives.ReadUInt32BigEndian(entry[16..]);
            var nanoseconds = BinaryPrimitives.ReadUInt32BigEndian(entry[20..]);
            var vmClock = BinaryPrimitives.ReadUInt64BigEndian(entry[24..]);
            long vmState = BinaryPrimitives.ReadUInt32BigEndian(entry[32..]);
            var extraLength = BinaryPrimitives.ReadUInt32BigEndian(entry[36..]);
            if (extraLength > MaximumExtraData)
            {
                throw new Qcow2FormatException($"snapshot {i} has {extraLength} bytes of extra data (qemu allows {MaximumExtraData})");
            }

            var entryLength = 40 + (int)extraLength + idLength + nameLength;

            var extra = entry.Slice(40, (int)extraLength);
            var size = imageSize;
            if (extra.Length >= 8)
            {
                vmState = (long)Math.Min(BinaryPrimitives.ReadUInt64BigEndian(extra), long.MaxValue);
            }

            if (extra.Length >= 16)
            {
                var diskSize = BinaryPrimitives.ReadUInt64BigEndian(extra[8..]);
                if (diskSize > long.MaxValue)
                {
                    throw new Qcow2FormatException($"snapshot {i} has an invalid disk size {diskSize}");
                }

                size = (long)diskSize;
            }
            else if (header.Version >= 3)
            {
                throw new Qcow2FormatException($"snapshot {i} lacks the extra data version 3 requires (disk size)");
            }

            var id = Encoding.UTF8.GetString(entry.Slice(40 + (int)extraLength, idLength));
            var name = Encoding.UTF8.GetString(entry.Slice(40 + (int)extraLength + idLength, nameLength));
            list.Add(new Qcow2SnapshotInfo(
                id,
                name,
                size,
                DateTimeOffset.FromUnixTimeSeconds(seconds).AddTicks(Math.Min(nanoseconds, 999_999_999u) / 100),
                TimeSpan.FromTicks((long)Math.Min(vmClock / 100, long.MaxValue)),
                vmState)
            {
                L1TableOffset = l1Offset > long.MaxValue ? -1 : (long)l1Offset,
                L1Size = l1Size > int.MaxValue ? -1 : (int)l1Size,
            });
            position += (entryLength + 7) & ~7;
        }

        tableLength = position;
        return list;
    }

    /// <summary>Finds a snapshot by id first, then by name (qemu's bdrv_snapshot_find_by_id_and_name order).</summary>
    public static Qcow2SnapshotInfo? Find(IReadOnlyList<Qcow2SnapshotInfo> snapshots, string idOrName) =>
        snapshots.FirstOrDefault(snapshot => snapshot.Id == idOrName) ?? snapshots.FirstOrDefault(snapshot => snapshot.Name == idOrName);
}
