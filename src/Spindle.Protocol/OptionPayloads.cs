using System.Buffers;
using System.Buffers.Binary;

namespace Spindle.Protocol;

/// <summary>
/// The data of NBD_OPT_INFO and NBD_OPT_GO.
/// </summary>
/// <remarks>
/// <code>
///  u32 name length (MUST be &lt;= option length - 6) | name | u16 count N | N x u16 NBD_INFO_* request
/// </code>
/// </remarks>
public sealed record InfoRequest(string ExportName, IReadOnlyList<InfoType> Requests)
{
    /// <summary>Parses INFO/GO data; on failure <paramref name="problem"/> says why (the reply is ERR_INVALID).</summary>
    public static bool TryParse(ReadOnlySpan<byte> data, out InfoRequest? request, out string? problem)
    {
        request = null;
        if (data.Length < 6)
        {
            problem = $"INFO/GO data of {data.Length} bytes is shorter than the 6-byte minimum";
            return false;
        }

        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > (uint)(data.Length - 6))
        {
            problem = $"INFO/GO export name length {nameLength} overruns the option's {data.Length} bytes";
            return false;
        }

        if (!NbdString.TryDecode(data.Slice(4, (int)nameLength), out var name, out problem))
        {
            problem = "export name: " + problem;
            return false;
        }

        var rest = data[(4 + (int)nameLength)..];
        int count = BinaryPrimitives.ReadUInt16BigEndian(rest);
        if (rest.Length != 2 + (2 * count))
        {
            problem = $"INFO/GO lists {count} information requests but carries {rest.Length - 2} bytes for them";
            return false;
        }

        var requests = new InfoType[count];
        for (var i = 0; i < count; i++)
        {
            requests[i] = (InfoType)BinaryPrimitives.ReadUInt16BigEndian(rest[(2 + (2 * i))..]);
        }

        request = new InfoRequest(name, requests);
        problem = null;
        return true;
    }

    public byte[] ToBytes()
    {
        var nameLength = NbdString.ByteCount(ExportName);
        var bytes = new byte[4 + nameLength + 2 + (2 * Requests.Count)];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, (uint)nameLength);
        NbdString.Encode(ExportName, bytes.AsSpan(4));
        BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(4 + nameLength), (ushort)Requests.Count);
        for (var i = 0; i < Requests.Count; i++)
        {
            BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(6 + nameLength + (2 * i)), (ushort)Requests[i]);
        }

        return bytes;
    }
}

/// <summary>
/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
/// </summary>
/// <remarks>
/// <code>
///  u32 name length | name | u32 query count Q | Q x (u32 query length | query)
/// </code>
/// </remarks>
public sealed record MetaContextRequest(string ExportName, IReadOnlyList<string> Queries)
{
    public static bool TryParse(ReadOnlySpan<byte> data, out MetaContextRequest? request, out string? problem)
    {
        request = null;
        var reader = new SpanReader(data);
        if (!reader.TryReadUInt32(out var nameLength) || !reader.TryReadBytes(nameLength, out var nameBytes))
        {
            problem = "meta context export name overruns the option data";
            return false;
        }

        if (!NbdString.TryDecode(nameBytes, out var name, out problem))
        {
            problem = "export name: " + problem;
            return false;
        }

        if (!reader.TryReadUInt32(out var count))
        {
            problem = "meta context option has no query count";
            return false;
        }

        // Each query needs at least its 4-byte length, so a count beyond that is a lie: refuse before allocating.
        if (count > (uint)reader.Remaining / 4)
        {
            problem = $"meta context option claims {count} queries but has room for at most {reader.Remaining / 4}";
            return false;
        }

        var queries = new List<string>((int)count);
        for (var i = 0u; i < count; i++)
        {
            if (!reader.TryReadUInt32(out var queryLength) || !reader.TryReadBytes(queryLength, out var queryBytes))
            {
                problem = $"meta context query {i} overruns the option data";
                return false;
            }

            if (!NbdString.TryDecode(queryBytes, out var query, out problem))
            {
                problem = $"meta context query {i}: {problem}";
                return false;
            }

            queries.Add(query);
        }

        if (reader.Remaining != 0)
        {
            problem = $"meta context option has {reader.Remaining} trailing bytes";
            return false;
        }

        request = new MetaContextRequest(name, queries);
        problem = null;
        return true;
    }

    public byte[] ToBytes()
    {
        var writer = new ArrayBufferWriter<byte>();
        WireWriting.WriteLengthPrefixedString(writer, ExportName);
        WireWriting.WriteUInt32(writer, (uint)Queries.Count);
        foreach (var query in Queries)
        {
            WireWriting.WriteLengthPrefixedString(writer, query);
        }

        return writer.WrittenSpan.ToArray();
    }
}

/// <summary>Payloads of NBD_REP_INFO (the 2-byte type included).</summary>
public static class InfoReplies
{
    public const int ExportLength = 12;
    public const int BlockSizeLength = 14;

    public static int WriteExport(Span<byte> destination, ulong size, TransmissionFlags flags)
    {
        BinaryPrimitives.WriteUInt16BigEndian(destination, (ushort)InfoType.Export);
        BinaryPrimitives.WriteUInt64BigEndian(destination[2..], size);
        BinaryPrimitives.WriteUInt16BigEndian(destination[10..], (ushort)flags);
        return ExportLength;
    }

    public static int WriteBlockSize(Span<byte> destination, BlockSizeConstraints sizes)
    {
        BinaryPrimitives.WriteUInt16BigEndian(destination, (ushort)InfoType.BlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(destination[2..], sizes.Minimum);
        BinaryPrimitives.WriteUInt32BigEndian(destination[6..], sizes.Preferred);
        BinaryPrimitives.WriteUInt32BigEndian(destination[10..], sizes.Maximum);
        return BlockSizeLength;
    }

    /// <summary>NAME or DESCRIPTION: the type is prepended to the string, never written over it.</summary>
    public static byte[] StringInfo(InfoType type, string value)
    {
        var bytes = new byte[2 + NbdString.ByteCount(value)];
        BinaryPrimitives.WriteUInt16BigEndian(bytes, (ushort)type);
        NbdString.Encode(value, bytes.AsSpan(2));
        return bytes;
    }

    /// <summary>Reads the type of an NBD_REP_INFO payload.</summary>
    public static bool TryReadType(ReadOnlySpan<byte> payload, out InfoType type)
    {
        type = default;
        if (payload.Length < 2)
        {
            return false;
        }

        type = (InfoType)BinaryPrimitives.ReadUInt16BigEndian(payload);
        return true;
    }

    public static bool TryReadExport(ReadOnlySpan<byte> payload, out ulong size, out TransmissionFlags flags)
    {
        size = 0;
        flags = TransmissionFlags.None;
        if (payload.Length != ExportLength || BinaryPrimitives.ReadUInt16BigEndian(payload) != (ushort)InfoType.Export)
        {
            return false;
        }

        size = BinaryPrimitives.ReadUInt64BigEndian(payload[2..]);
        flags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(payload[10..]);
        return true;
    }

    public static bool TryReadBlockSize(ReadOnlySpan<byte> payload, out BlockSizeConstraints sizes)
    {
        sizes = default;
        if (payload.Length != BlockSizeLength || BinaryPrimitives.ReadUInt16BigEndian(payload) != (ushort)InfoType.BlockSize)
        {
            return false;
        }

        sizes = new BlockSizeConstraints(
            BinaryPrimitives.ReadUInt32BigEndian(payload[2..]),
            BinaryPrimitives.ReadUInt32BigEndian(payload[6..]),
            BinaryPrimitives.ReadUInt32BigEndian(payload[10..]));
        return true;
    }
}

/// <summary>NBD_REP_SERVER: u32 name length, name, then optional human-readable details.</summary>
public static class ServerReply
{
    public static byte[] Create(string name, string? description)
    {
        var nameLength = NbdString.ByteCount(name);
        var descriptionLength = string.IsNullOrEmpty(description) ? 0 : NbdString.ByteCount(description);
        var bytes = new byte[4 + nameLength + descriptionLength];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, (uint)nameLength);
        NbdString.Encode(name, bytes.AsSpan(4));
        if (descriptionLength > 0)
        {
            NbdString.Encode(description!, bytes.AsSpan(4 + nameLength));
        }

        return bytes;
    }

    public static bool TryParse(ReadOnlySpan<byte> payload, out string name, out string description)
    {
        name = description = string.Empty;
        if (payload.Length < 4)
        {
            return false;
        }

        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(payload);
        if (nameLength > (uint)(payload.Length - 4))
        {
            return false;
        }

        if (!NbdString.TryDecode(payload.Slice(4, (int)nameLength), out name, out _))
        {
            return false;
        }

        var rest = payload[(4 + (int)nameLength)..];
        if (!rest.IsEmpty && !NbdString.TryDecode(rest, out description, out _))
        {
            description = string.Empty;
        }

        return true;
    }
}

/// <summary>NBD_REP_META_CONTEXT: u32 context id, then the context name.</summary>
public static class MetaContextReply
{
    public static byte[] Create(uint contextId, string name)
    {
        var bytes = new byte[4 + NbdString.ByteCount(name)];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, contextId);
        NbdString.Encode(name, bytes.AsSpan(4));
        return bytes;
    }

    public static bool TryParse(ReadOnlySpan<byte> payload, out uint contextId, out string name)
    {
        contextId = 0;
        name = string.Empty;
        if (payload.Length < 4)
        {
            return false;
        }

        contextId = BinaryPrimitives.ReadUInt32BigEndian(payload);
        return NbdString.TryDecode(payload[4..], out name, out _);
    }
}

/// <summary>Block size constraints advertised with NBD_INFO_BLOCK_SIZE.</summary>
public readonly record struct BlockSizeConstraints(uint Minimum, uint Preferred, uint Maximum)
{
    /// <summary>What a server assumes when nothing was advertised: 1, 4096, 32 MiB.</summary>
    public static BlockSizeConstraints Default => new(1, NbdLimits.DefaultPreferredBlockSize, NbdLimits.DefaultMaxPayload);

    /// <summary>Checks the rules of "Block size constraints": powers of two, ordering, the 64 KiB minimum cap.</summary>
    public bool IsValid(out string? problem)
    {
        if (Minimum == 0 || !uint.IsPow2(Minimum) || Minimum > NbdLimits.MaxMinimumBlockSize)
        {
            problem = $"minimum block size {Minimum} must be a power of two no larger than 65536";
            return false;
        }

        if (!uint.IsPow2(Preferred) || Preferred < Math.Max(Minimum, 512u))
        {
            problem = $"preferred block size {Preferred} must be a power of two of at least max(minimum, 512)";
            return false;
        }

        if (Maximum != uint.MaxValue && (Maximum < Preferred || Maximum % Minimum != 0))
        {
            problem = $"maximum block size {Maximum} must be a multiple of the minimum and at least the preferred size";
            return false;
        }

        problem = null;
        return true;
    }
}

/// <summary>A forward-only big-endian reader over a span; every read is bounds-checked.</summary>
public ref struct SpanReader(ReadOnlySpan<byte> data)
{
    private readonly ReadOnlySpan<byte> _data = data;
    private int _position;

    public readonly int Remaining => _data.Length - _position;

    public bool TryReadUInt16(out ushort value)
    {
        value = 0;
        if (Remaining < 2)
        {
            return false;
        }

        value = BinaryPrimitives.ReadUInt16BigEndian(_data[_position..]);
        _position += 2;
        return true;
    }

    public bool TryReadUInt32(out uint value)
    {
        value = 0;
        if (Remaining < 4)
        {
            return false;
        }

        value = BinaryPrimitives.ReadUInt32BigEndian(_data[_position..]);
        _position += 4;
        return true;
    }

    public bool TryReadUInt64(out ulong value)
    {
        value = 0;
        if (Remaining < 8)
        {
            return false;
        }

        value = BinaryPrimitives.ReadUInt64BigEndian(_data[_position..]);
        _position += 8;
        return true;
    }

    public bool TryReadBytes(uint count, out ReadOnlySpan<byte> bytes)
    {
        bytes = default;
        if (count > (uint)Remaining)
        {
            return false;
        }

        bytes = _data.Slice(_position, (int)count);
        _position += (int)count;
        return true;
    }
}

/// <summary>Small big-endian writing helpers for building option data.</summary>
public static class WireWriting
{
    public static void WriteUInt32(IBufferWriter<byte> writer, uint value)
    {
        BinaryPrimitives.WriteUInt32BigEndian(writer.GetSpan(4), value);
        writer.Advance(4);
    }

    public static void WriteLengthPrefixedString(IBufferWriter<byte> writer, string value)
    {
        var length = NbdString.ByteCount(value);
        WriteUInt32(writer, (uint)length);
        var span = writer.GetSpan(length);
        NbdString.Encode(value, span);
        writer.Advance(length);
    }
}
