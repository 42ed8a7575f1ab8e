using System.Runtime.InteropServices;

namespace Spindle.Devices.Netlink;

/// <summary>
/// The netlink message header (<c>struct nlmsghdr</c>, include/uapi/linux/netlink.h), in the host's byte order
/// like everything netlink carries. <see cref="Length"/> counts the header itself and the payload, not the padding
/// to the next 4-byte boundary that separates messages in one datagram.
/// </summary>
/// <remarks>
/// <code>
///  0               4       6       8               12              16
///  +---------------+-------+-------+---------------+---------------+
///  | length (u32)  | type  | flags | sequence (u32)| port id (u32) |
///  +---------------+-------+-------+---------------+---------------+
///  type: a generic netlink family id, or 1 NOOP, 2 ERROR, 3 DONE
/// </code>
/// </remarks>
internal readonly record struct NetlinkHeader(uint Length, ushort Type, ushort Flags, uint Sequence, uint PortId)
{
    public const int Size = 16;

    /// <summary>NLMSG_ERROR: an error code (0 is the acknowledgement NLM_F_ACK asked for) and the request's header.</summary>
    public const ushort TypeError = 2;

    /// <summary>NLMSG_DONE: the end of a multi-part answer.</summary>
    public const ushort TypeDone = 3;

    public const ushort FlagRequest = 0x1;
    public const ushort FlagMulti = 0x2;
    public const ushort FlagAck = 0x4;

    /// <summary>Messages (and attributes) start on 4-byte boundaries: NLMSG_ALIGN / NLA_ALIGN.</summary>
    public static int Align(int length) => (length + 3) & ~3;

    public static void Write(Span<byte> destination, uint length, ushort type, ushort flags, uint sequence, uint portId)
    {
        MemoryMarshal.Write(destination, in length);
        MemoryMarshal.Write(destination[4..], in type);
        MemoryMarshal.Write(destination[6..], in flags);
        MemoryMarshal.Write(destination[8..], in sequence);
        MemoryMarshal.Write(destination[12..], in portId);
    }

    /// <summary>
    /// Reads the header of the first message in <paramref name="source"/> (a received datagram or what is left of
    /// it). False when fewer than 16 bytes remain, or the length is below the header or beyond the datagram: the
    /// kernel never sends a message split over datagrams, so a short one is malformed, not incomplete.
    /// </summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out NetlinkHeader header)
    {
        header = default;
        if (source.Length < Size)
        {
            return false;
        }

        var length = MemoryMarshal.Read<uint>(source);
        if (length < Size || length > (uint)source.Length)
        {
            return false;
        }

        header = new NetlinkHeader(
            length,
            MemoryMarshal.Read<ushort>(source[4..]),
            MemoryMarshal.Read<ushort>(source[6..]),
            MemoryMarshal.Read<uint>(source[8..]),
            MemoryMarshal.Read<uint>(source[12..]));
        return true;
    }
}

/// <summary>
/// The generic netlink header (<c>struct genlmsghdr</c>, include/uapi/linux/genetlink.h) that follows the netlink
/// header of every message to or from a generic netlink family; the family's attributes come after it.
/// </summary>
/// <remarks>
/// <code>
///  0       1       2               4
///  +-------+-------+---------------+
///  | cmd   | vers. | reserved (0)  |
///  +-------+-------+---------------+
/// </code>
/// </remarks>
internal readonly record struct GenericHeader(byte Command, byte Version)
{
    public const int Size = 4;

    public static bool TryRead(ReadOnlySpan<byte> source, out GenericHeader header)
    {
        header = default;
        if (source.Length < Size)
        {
            return false;
        }

        header = new GenericHeader(source[0], source[1]);
        return true;
    }
}

/// <summary>One received netlink message: its header and the payload after it (padding excluded).</summary>
internal readonly ref struct NetlinkMessage
{
    public NetlinkMessage(NetlinkHeader header, ReadOnlySpan<byte> payload)
    {
        Header = header;
        Payload = payload;
    }

    public NetlinkHeader Header { get; }

    public ReadOnlySpan<byte> Payload { get; }

    /// <summary>
    /// For an NLMSG_ERROR message: the negative errno it carries (0 for an acknowledgement).
    /// </summary>
    /// <remarks>
    /// <code>
    ///  0               4                                       20
    ///  +---------------+---------------------------------------+---------
    ///  | error (s32)   | the request's nlmsghdr (16 bytes)     | [its payload, unless capped]
    ///  +---------------+---------------------------------------+---------
    /// </code>
    /// </remarks>
    public bool TryReadError(out int error, out uint requestSequence)
    {
        error = 0;
        requestSequence = 0;
        if (Header.Type != NetlinkHeader.TypeError || Payload.Length < 4 + NetlinkHeader.Size)
        {
            return false;
        }

        error = MemoryMarshal.Read<int>(Payload);
        requestSequence = MemoryMarshal.Read<uint>(Payload[(4 + 8)..]);
        return true;
    }
}

/// <summary>Walks the messages of one received datagram.</summary>
internal ref struct NetlinkDatagramReader
{
    private ReadOnlySpan<byte> _rest;

    public NetlinkDatagramReader(ReadOnlySpan<byte> datagram)
    {
        _rest = datagram;
    }

    /// <summary>Set when the bytes left over are not a whole message (a truncated or corrupt datagram).</summary>
    public bool IsMalformed { get; private set; }

    public bool TryNext(out NetlinkMessage message)
    {
        message = default;
        if (_rest.IsEmpty || IsMalformed)
        {
            return false;
        }

        if (!NetlinkHeader.TryRead(_rest, out var header))
        {
            IsMalformed = true;
            return false;
        }

        var length = (int)header.Length;
        message = new NetlinkMessage(header, _rest[NetlinkHeader.Size..length]);
        var next = NetlinkHeader.Align(length);
        _rest = next >= _rest.Length ? [] : _rest[next..];
        return true;
    }
}
