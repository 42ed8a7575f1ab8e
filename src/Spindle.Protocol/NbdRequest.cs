using System.Buffers.Binary;

namespace Spindle.Protocol;

/// <summary>
/// A compact transmission request (28 bytes, followed by <see cref="Length"/> payload bytes for WRITE only).
/// </summary>
/// <remarks>
/// <code>
///  0               4       6       8                      16                     24          28
///  +---------------+-------+-------+-----------------------+----------------------+-----------+
///  | magic         | flags | type  | cookie                | offset               | length    |
///  | 0x25609513    | u16   | u16   | u64 (opaque)          | u64                  | u32       |
///  +---------------+-------+-------+-----------------------+----------------------+-----------+
/// </code>
/// The cookie ("handle" in older texts) is echoed verbatim in every reply and never interpreted.
/// </remarks>
public readonly record struct NbdRequest(CommandFlags Flags, NbdCommand Command, ulong Cookie, ulong Offset, uint Length)
{
    private const int MagicOffset = 0;
    private const int FlagsOffset = 4;
    private const int TypeOffset = 6;
    private const int CookieOffset = 8;
    private const int OffsetOffset = 16;
    private const int LengthOffset = 24;

    /// <summary>The number of payload bytes that follow this header on the wire.</summary>
    public int PayloadLength => Command == NbdCommand.Write ? checked((int)Math.Min(Length, int.MaxValue)) : 0;

    /// <summary>Whether this request carries a payload (only WRITE does, without extended headers).</summary>
    public bool HasPayload => Command == NbdCommand.Write;

    /// <summary>
    /// Parses a request header. Returns <see cref="ParseStatus.NeedMoreData"/> when fewer than 28 bytes are
    /// available and <see cref="ParseStatus.Invalid"/> when the magic is wrong: the stream is then out of step
    /// and the only safe response is to close it.
    /// </summary>
    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out NbdRequest request)
    {
        if (source.Length < NbdLimits.RequestHeaderLength)
        {
            request = default;
            return ParseStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt32BigEndian(source[MagicOffset..]) != NbdMagic.RequestMagic)
        {
            request = default;
            return ParseStatus.Invalid;
        }

        request = new NbdRequest(
            (CommandFlags)BinaryPrimitives.ReadUInt16BigEndian(source[FlagsOffset..]),
            (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(source[TypeOffset..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[CookieOffset..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[OffsetOffset..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[LengthOffset..]));
        return ParseStatus.Done;
    }

    /// <summary>Writes the 28-byte header (not the payload) and returns the number of bytes written.</summary>
    public int WriteTo(Span<byte> destination)
    {
        var header = destination[..NbdLimits.RequestHeaderLength];
        BinaryPrimitives.WriteUInt32BigEndian(header[MagicOffset..], NbdMagic.RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(header[FlagsOffset..], (ushort)Flags);
        BinaryPrimitives.WriteUInt16BigEndian(header[TypeOffset..], (ushort)Command);
        BinaryPrimitives.WriteUInt64BigEndian(header[CookieOffset..], Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(header[OffsetOffset..], Offset);
        BinaryPrimitives.WriteUInt32BigEndian(header[LengthOffset..], Length);
        return NbdLimits.RequestHeaderLength;
    }

    public override string ToString() =>
        $"{Command} cookie=0x{Cookie:x} offset={Offset} length={Length}" + (Flags == CommandFlags.None ? "" : $" flags={Flags}");
}

/// <summary>The outcome of a <c>TryRead</c> parser.</summary>
public enum ParseStatus
{
    /// <summary>A whole message was parsed.</summary>
    Done,

    /// <summary>The buffer holds only part of a message; read more and try again.</summary>
    NeedMoreData,

    /// <summary>The bytes are not a valid message (wrong magic, inconsistent lengths).</summary>
    Invalid,
}
