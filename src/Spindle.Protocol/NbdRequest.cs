using System.Buffers.Binary;

namespace Spindle.Protocol;

/// <summary>
/// A transmission request, compact (28 bytes) or extended (32 bytes, once NBD_OPT_EXTENDED_HEADERS was agreed),
/// so that one server loop can serve both: it parses with the mode it negotiated and reads <see cref="LongLength"/>
/// and <see cref="HasPayload"/>, which mean the right thing in either form.
/// </summary>
/// <remarks>
/// Compact request (proto.md, "Request message"):
/// <code>
///  0               4       6       8                      16                     24          28
///  +---------------+-------+-------+-----------------------+----------------------+-----------+
///  | magic         | flags | type  | cookie                | offset               | length    |
///  | 0x25609513    | u16   | u16   | u64 (opaque)          | u64                  | u32       |
///  +---------------+-------+-------+-----------------------+----------------------+-----------+
/// </code>
/// Extended request (extension-ext-header proto.md, "Request message"; the reference sheet §8):
/// <code>
///  0               4       6       8                      16                     24                     32
///  +---------------+-------+-------+-----------------------+----------------------+----------------------+
///  | magic         | flags | type  | cookie                | offset               | length               |
///  | 0x21e41c71    | u16   | u16   | u64 (opaque)          | u64                  | u64                  |
///  +---------------+-------+-------+-----------------------+----------------------+----------------------+
/// </code>
/// The first 24 bytes lay out alike; only the magic and the width of the length differ. In the compact form only
/// WRITE carries a payload (of <c>length</c> bytes). In the extended form a payload follows exactly when
/// NBD_CMD_FLAG_PAYLOAD_LEN is set, and <c>length</c> is then its size; without the flag <c>length</c> is a
/// 64-bit effect length. The cookie ("handle" in older texts) is echoed verbatim in every reply.
/// </remarks>
public readonly record struct NbdRequest
{
    private const int MagicOffset = 0;
    private const int FlagsOffset = 4;
    private const int TypeOffset = 6;
    private const int CookieOffset = 8;
    private const int OffsetOffset = 16;
    private const int LengthOffset = 24;

    /// <summary>A compact request: the form every client speaks unless extended headers were negotiated.</summary>
    public NbdRequest(CommandFlags flags, NbdCommand command, ulong cookie, ulong offset, uint length)
        : this(flags, command, cookie, offset, length, extended: false)
    {
    }

    /// <summary>A request in the given form; a compact one cannot carry a length above 32 bits.</summary>
    public NbdRequest(CommandFlags flags, NbdCommand command, ulong cookie, ulong offset, ulong length, bool extended)
    {
        if (!extended && length > uint.MaxValue)
        {
            throw new ArgumentOutOfRangeException(nameof(length), "A compact request has a 32-bit length; longer ones need extended headers.");
        }

        Flags = flags;
        Command = command;
        Cookie = cookie;
        Offset = offset;
        LongLength = length;
        IsExtended = extended;
    }

    public CommandFlags Flags { get; init; }

    public NbdCommand Command { get; init; }

    public ulong Cookie { get; init; }

    public ulong Offset { get; init; }

    /// <summary>
    /// The length field in full. Compact: the effect length, which for WRITE is also the payload size. Extended:
    /// the payload size when <see cref="CommandFlags.PayloadLength"/> is set (for WRITE also the effect length;
    /// for BLOCK_STATUS the effect length is inside the payload, see <see cref="BlockStatusPayload"/>), otherwise
    /// a 64-bit effect length (what lets TRIM, WRITE_ZEROES and BLOCK_STATUS cover more than 4 GiB).
    /// </summary>
    public ulong LongLength { get; init; }

    /// <summary>Whether this is the 32-byte extended form (magic 0x21e41c71).</summary>
    public bool IsExtended { get; init; }

    /// <summary>
    /// The 32-bit length of the compact form, kept so code written before extended headers reads as before. For an
    /// extended request whose length does not fit it reads <see cref="uint.MaxValue"/> (never a truncated, smaller
    /// value, so size checks still refuse it); code serving extended requests reads <see cref="LongLength"/>.
    /// </summary>
    public uint Length
    {
        get => LongLength > uint.MaxValue ? uint.MaxValue : (uint)LongLength;
        init => LongLength = value;
    }

    /// <summary>The size of this request's header on the wire: 28 compact, 32 extended.</summary>
    public int HeaderLength => HeaderLengthFor(IsExtended);

    /// <summary>
    /// Whether payload bytes follow the header: compact, only WRITE; extended, when NBD_CMD_FLAG_PAYLOAD_LEN is set,
    /// and always for WRITE. The extension says a WRITE "MUST use" the flag, but qemu's client (8.2 to 10 at least)
    /// sends its extended WRITEs without it and its server reads the payload anyway; reading it keeps such a stream in
    /// step, where taking the length as an effect length would lose it.
    /// </summary>
    public bool HasPayload => Command == NbdCommand.Write || (IsExtended && (Flags & CommandFlags.PayloadLength) != 0);

    /// <summary>
    /// The number of payload bytes that follow this header on the wire, in full: check it against the largest
    /// payload accepted before buffering (an extended length may claim up to 2^64 - 1 bytes).
    /// </summary>
    public ulong WirePayloadLength => HasPayload ? LongLength : 0;

    /// <summary>The number of payload bytes that follow this header, capped at <see cref="int.MaxValue"/>.</summary>
    public int PayloadLength => HasPayload ? (int)Math.Min(LongLength, int.MaxValue) : 0;

    /// <summary>The header size of a request in the given form.</summary>
    public static int HeaderLengthFor(bool extended) =>
        extended ? NbdLimits.ExtendedRequestHeaderLength : NbdLimits.RequestHeaderLength;

    /// <summary>
    /// Parses a compact request header. Returns <see cref="ParseStatus.NeedMoreData"/> when fewer than 28 bytes are
    /// available and <see cref="ParseStatus.Invalid"/> when the magic is wrong: the stream is then out of step
    /// and the only safe response is to close it.
    /// </summary>
    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out NbdRequest request) => TryRead(source, extended: false, out request);

    /// <summary>
    /// Parses a request header in the form negotiated: compact (28 bytes, magic 0x25609513) or extended (32 bytes,
    /// magic 0x21e41c71). The other form's magic is <see cref="ParseStatus.Invalid"/>: after NBD_OPT_EXTENDED_HEADERS
    /// the client MUST use extended requests, and before it it cannot.
    /// </summary>
    public static ParseStatus TryRead(ReadOnlySpan<byte> source, bool extended, out NbdRequest request)
    {
        request = default;
        if (source.Length < HeaderLengthFor(extended))
        {
            return ParseStatus.NeedMoreData;
        }

        var magic = BinaryPrimitives.ReadUInt32BigEndian(source[MagicOffset..]);
        if (magic != (extended ? NbdMagic.ExtendedRequestMagic : NbdMagic.RequestMagic))
        {
            return ParseStatus.Invalid;
        }

        request = new NbdRequest(
            (CommandFlags)BinaryPrimitives.ReadUInt16BigEndian(source[FlagsOffset..]),
            (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(source[TypeOffset..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[CookieOffset..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[OffsetOffset..]),
            extended ? BinaryPrimitives.ReadUInt64BigEndian(source[LengthOffset..]) : BinaryPrimitives.ReadUInt32BigEndian(source[LengthOffset..]),
            extended);
        return ParseStatus.Done;
    }

    /// <summary>Writes the header in this request's form (not the payload) and returns the number of bytes written.</summary>
    public int WriteTo(Span<byte> destination)
    {
        var header = destination[..HeaderLength];
        BinaryPrimitives.WriteUInt32BigEndian(header[MagicOffset..], IsExtended ? NbdMagic.ExtendedRequestMagic : NbdMagic.RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(header[FlagsOffset..], (ushort)Flags);
        BinaryPrimitives.WriteUInt16BigEndian(header[TypeOffset..], (ushort)Command);
        BinaryPrimitives.WriteUInt64BigEndian(header[CookieOffset..], Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(header[OffsetOffset..], Offset);
        if (IsExtended)
        {
            BinaryPrimitives.WriteUInt64BigEndian(header[LengthOffset..], LongLength);
        }
        else if (LongLength > uint.MaxValue)
        {
            // Reachable only through an init of LongLength: the constructors refuse it.
            throw new InvalidOperationException($"A compact request cannot carry the length {LongLength}; it needs extended headers.");
        }
        else
        {
            BinaryPrimitives.WriteUInt32BigEndian(header[LengthOffset..], (uint)LongLength);
        }

        return header.Length;
    }

    public override string ToString() =>
        $"{Command} cookie=0x{Cookie:x} offset={Offset} length={LongLength}" + (Flags == CommandFlags.None ? "" : $" flags={Flags}");
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
