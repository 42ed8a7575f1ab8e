using System.Buffers;
using System.Runtime.InteropServices;
using System.Text;

namespace Spindle.Devices.Netlink;

/// <summary>
/// Netlink attributes (<c>struct nlattr</c>): type-length-value records, each starting on a 4-byte boundary. The
/// length counts the 4-byte header and the value, not the padding. A nested attribute's value is a run of
/// attributes; the kernel marks it with NLA_F_NESTED (bit 15 of the type) where it builds one with
/// <c>nla_nest_start</c>, and older code leaves the bit clear (<c>nla_nest_start_noflag</c>).
/// </summary>
/// <remarks>
/// <code>
///  0       2       4
///  +-------+-------+---------------------------+-----------+
///  | len   | type  | value (len - 4 bytes)     | pad to 4  |
///  +-------+-------+---------------------------+-----------+
///  type: bit 15 NLA_F_NESTED, bit 14 NLA_F_NET_BYTEORDER, bits 0-13 the attribute number
/// </code>
/// </remarks>
internal ref struct NetlinkAttributeReader
{
    public const int HeaderSize = 4;
    public const ushort NestedFlag = 0x8000;
    public const ushort ByteOrderFlag = 0x4000;
    private const ushort TypeMask = 0x3fff;

    private ReadOnlySpan<byte> _rest;

    public NetlinkAttributeReader(ReadOnlySpan<byte> attributes)
    {
        _rest = attributes;
    }

    /// <summary>Set when what is left is not a whole attribute (a length below 4 or past the end).</summary>
    public bool IsMalformed { get; private set; }

    /// <summary>The next attribute: its number (flags removed) and its value.</summary>
    public bool TryNext(out ushort type, out ReadOnlySpan<byte> value)
    {
        type = 0;
        value = default;
        if (_rest.IsEmpty || IsMalformed)
        {
            return false;
        }

        if (_rest.Length < HeaderSize)
        {
            IsMalformed = true;
            return false;
        }

        var length = MemoryMarshal.Read<ushort>(_rest);
        if (length < HeaderSize || length > _rest.Length)
        {
            IsMalformed = true;
            return false;
        }

        type = (ushort)(MemoryMarshal.Read<ushort>(_rest[2..]) & TypeMask);
        value = _rest[HeaderSize..length];
        var next = NetlinkHeader.Align(length);
        _rest = next >= _rest.Length ? [] : _rest[next..];
        return true;
    }

    public static bool TryReadU8(ReadOnlySpan<byte> value, out byte result)
    {
        result = value.Length == 1 ? value[0] : (byte)0;
        return value.Length == 1;
    }

    public static bool TryReadU16(ReadOnlySpan<byte> value, out ushort result) => TryRead(value, out result);

    public static bool TryReadU32(ReadOnlySpan<byte> value, out uint result) => TryRead(value, out result);

    public static bool TryReadU64(ReadOnlySpan<byte> value, out ulong result) => TryRead(value, out result);

    /// <summary>A NUL-terminated string value (the NUL is required, as NLA_NUL_STRING has it); at most 255 bytes.</summary>
    public static bool TryReadString(ReadOnlySpan<byte> value, out string result)
    {
        result = string.Empty;
        var end = value.IndexOf((byte)0);
        if (end < 0 || end > 255)
        {
            return false;
        }

        result = Encoding.UTF8.GetString(value[..end]);
        return true;
    }

    private static bool TryRead<T>(ReadOnlySpan<byte> value, out T result)
        where T : unmanaged
    {
        result = default;
        if (value.Length != Marshal.SizeOf<T>())
        {
            return false;
        }

        result = MemoryMarshal.Read<T>(value);
        return true;
    }
}

/// <summary>
/// Builds one generic netlink request: the netlink header (its length filled in by <see cref="ToArray"/>), the
/// generic header and attributes, nested ones included. Requests are small (a few dozen bytes), so a growable
/// buffer is enough.
/// </summary>
internal sealed class NetlinkRequestBuilder
{
    private readonly ArrayBufferWriter<byte> _buffer = new(128);

    public NetlinkRequestBuilder(ushort family, ushort flags, uint sequence, byte command, byte version)
    {
        var header = _buffer.GetSpan(NetlinkHeader.Size + GenericHeader.Size)[..(NetlinkHeader.Size + GenericHeader.Size)];
        header.Clear();
        NetlinkHeader.Write(header, 0, family, flags, sequence, 0);
        header[NetlinkHeader.Size] = command;
        header[NetlinkHeader.Size + 1] = version;
        _buffer.Advance(header.Length);
    }

    public NetlinkRequestBuilder U8(ushort type, byte value) => Put(type, [value]);

    public NetlinkRequestBuilder U32(ushort type, uint value) => Put(type, MemoryMarshal.AsBytes(new ReadOnlySpan<uint>(in value)));

    public NetlinkRequestBuilder U64(ushort type, ulong value) => Put(type, MemoryMarshal.AsBytes(new ReadOnlySpan<ulong>(in value)));

    /// <summary>A NUL-terminated string, as NLA_STRING and NLA_NUL_STRING policies accept.</summary>
    public NetlinkRequestBuilder String(ushort type, string value)
    {
        var bytes = new byte[Encoding.UTF8.GetByteCount(value) + 1];
        Encoding.UTF8.GetBytes(value, bytes);
        return Put(type, bytes);
    }

    /// <summary>Opens a nested attribute (with NLA_F_NESTED); returns the mark <see cref="EndNested"/> takes.</summary>
    public int BeginNested(ushort type)
    {
        var start = _buffer.WrittenCount;
        var header = _buffer.GetSpan(NetlinkAttributeReader.HeaderSize)[..NetlinkAttributeReader.HeaderSize];
        ushort flagged = (ushort)(type | NetlinkAttributeReader.NestedFlag);
        MemoryMarshal.Write(header[2..], in flagged);
        _buffer.Advance(NetlinkAttributeReader.HeaderSize);
        return start;
    }

    /// <summary>Closes the nested attribute opened at <paramref name="mark"/>: its length covers everything since.</summary>
    public void EndNested(int mark)
    {
        var length = checked((ushort)(_buffer.WrittenCount - mark));
        MemoryMarshal.Write(MemoryMarshal.AsMemory(_buffer.WrittenMemory).Span[mark..], in length);
    }

    /// <summary>The finished request, its netlink length set.</summary>
    public byte[] ToArray()
    {
        var bytes = _buffer.WrittenSpan.ToArray();
        var length = (uint)bytes.Length;
        MemoryMarshal.Write(bytes, in length);
        return bytes;
    }

    private NetlinkRequestBuilder Put(ushort type, ReadOnlySpan<byte> value)
    {
        var length = NetlinkAttributeReader.HeaderSize + value.Length;
        var padded = NetlinkHeader.Align(length);
        var span = _buffer.GetSpan(padded)[..padded];
        span.Clear();
        var header = checked((ushort)length);
        MemoryMarshal.Write(span, in header);
        MemoryMarshal.Write(span[2..], in type);
        value.CopyTo(span[NetlinkAttributeReader.HeaderSize..]);
        _buffer.Advance(padded);
        return this;
    }
}
