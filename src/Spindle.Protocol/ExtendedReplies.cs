using System.Buffers.Binary;

namespace Spindle.Protocol;

/// <summary>
/// An extended reply chunk header (32 bytes), followed by <see cref="PayloadLength"/> bytes. Once extended headers
/// are negotiated every reply is made of these: simple replies are forbidden (extension-ext-header proto.md,
/// "Extended reply chunk message"; the reference sheet §8).
/// </summary>
/// <remarks>
/// <code>
///  0               4       6       8                      16                     24                     32
///  +---------------+-------+-------+-----------------------+----------------------+----------------------+
///  | 0x6e8a278c    | flags | type  | cookie (u64)          | offset (u64)         | length (u64)         |
///  +---------------+-------+-------+-----------------------+----------------------+----------------------+
/// </code>
/// <c>offset</c> MUST echo the request's offset, even in OFFSET_DATA whose payload names its own. <c>length</c> is
/// 64 bits wide to match the request, but only ever counts payload bytes, so in practice it stays within 32 bits
/// and a client MAY hang up on a larger one: that limit is the reader's to apply before buffering the payload.
/// </remarks>
public readonly record struct ExtendedReplyHeader(ReplyFlags Flags, ReplyType Type, ulong Cookie, ulong Offset, ulong PayloadLength)
{
    public const int Length = NbdLimits.ExtendedReplyHeaderLength;

    private const int MagicOffset = 0;
    private const int FlagsOffset = 4;
    private const int TypeOffset = 6;
    private const int CookieOffset = 8;
    private const int OffsetOffset = 16;
    private const int LengthOffset = 24;

    public bool IsDone => (Flags & ReplyFlags.Done) != 0;

    public bool IsError => ((ushort)Type & 0x8000) != 0;

    /// <summary>Writes the 32-byte header and returns the number of bytes written.</summary>
    public static int Write(Span<byte> destination, ReplyFlags flags, ReplyType type, ulong cookie, ulong offset, ulong payloadLength)
    {
        var header = destination[..Length];
        BinaryPrimitives.WriteUInt32BigEndian(header[MagicOffset..], NbdMagic.ExtendedReplyMagic);
        BinaryPrimitives.WriteUInt16BigEndian(header[FlagsOffset..], (ushort)flags);
        BinaryPrimitives.WriteUInt16BigEndian(header[TypeOffset..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(header[CookieOffset..], cookie);
        BinaryPrimitives.WriteUInt64BigEndian(header[OffsetOffset..], offset);
        BinaryPrimitives.WriteUInt64BigEndian(header[LengthOffset..], payloadLength);
        return Length;
    }

    /// <summary>
    /// Parses an extended reply chunk header: <see cref="ParseStatus.NeedMoreData"/> under 32 bytes,
    /// <see cref="ParseStatus.Invalid"/> for any other magic (a simple or structured reply is a protocol violation
    /// once extended headers are on, and the stream cannot be trusted after it).
    /// </summary>
    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out ExtendedReplyHeader header)
    {
        header = default;
        if (source.Length < Length)
        {
            return ParseStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt32BigEndian(source[MagicOffset..]) != NbdMagic.ExtendedReplyMagic)
        {
            return ParseStatus.Invalid;
        }

        header = new ExtendedReplyHeader(
            (ReplyFlags)BinaryPrimitives.ReadUInt16BigEndian(source[FlagsOffset..]),
            (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(source[TypeOffset..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[CookieOffset..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[OffsetOffset..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[LengthOffset..]));
        return ParseStatus.Done;
    }
}

/// <summary>Chunk writers in the form of the request they answer (structured or extended).</summary>
public static partial class StructuredReplyChunks
{
    /// <summary>The chunk header size in a form: 20 structured, 32 extended.</summary>
    public static int HeaderLength(bool extended) => extended ? ExtendedReplyHeader.Length : StructuredReplyHeader.Length;

    /// <summary>A NONE chunk's size in a form (header only).</summary>
    public static int NoneLengthFor(bool extended) => HeaderLength(extended);

    /// <summary>Header plus the offset before OFFSET_DATA's data, in a form.</summary>
    public static int OffsetDataPrefixLengthFor(bool extended) => HeaderLength(extended) + OffsetDataFixedPayload;

    /// <summary>An OFFSET_HOLE chunk's size in a form (its hole size stays 32 bits in both).</summary>
    public static int OffsetHoleLengthFor(bool extended) => HeaderLength(extended) + OffsetHolePayload;

    /// <summary>The bytes an ERROR chunk with this message takes in a form.</summary>
    public static int ErrorLength(string? message, bool extended) => HeaderLength(extended) + ErrorFixedPayload + MessageByteCount(message);

    /// <summary>The bytes an ERROR_OFFSET chunk with this message takes in a form.</summary>
    public static int ErrorOffsetLength(string? message, bool extended) => ErrorLength(message, extended) + 8;

    /// <summary>
    /// Writes a chunk header for <paramref name="request"/>: structured for a compact request, extended (echoing its
    /// offset) for an extended one. Returns the header length; the caller writes the payload after it.
    /// </summary>
    public static int WriteHeader(Span<byte> destination, ReplyFlags flags, ReplyType type, in NbdRequest request, uint payloadLength) =>
        ChunkTarget.For(request).WriteHeader(destination, flags, type, payloadLength);

    /// <summary>Writes a NONE chunk with DONE set, in <paramref name="request"/>'s form.</summary>
    public static int WriteNone(Span<byte> destination, in NbdRequest request) =>
        ChunkTarget.For(request).WriteHeader(destination, ReplyFlags.Done, ReplyType.None, 0);

    /// <summary>Writes the header and offset of an OFFSET_DATA chunk in <paramref name="request"/>'s form.</summary>
    public static int WriteOffsetDataPrefix(Span<byte> destination, ReplyFlags flags, in NbdRequest request, ulong offset, int dataLength) =>
        WriteOffsetDataPrefix(destination, flags, ChunkTarget.For(request), offset, dataLength);

    /// <summary>Writes an OFFSET_HOLE chunk in <paramref name="request"/>'s form; the hole size is 32 bits in both.</summary>
    public static int WriteOffsetHole(Span<byte> destination, ReplyFlags flags, in NbdRequest request, ulong offset, uint holeSize) =>
        WriteOffsetHole(destination, flags, ChunkTarget.For(request), offset, holeSize);

    /// <summary>Writes an ERROR chunk in <paramref name="request"/>'s form.</summary>
    public static int WriteError(Span<byte> destination, ReplyFlags flags, in NbdRequest request, NbdError error, string? message) =>
        WriteError(destination, flags, ChunkTarget.For(request), error, message, errorOffset: null);

    /// <summary>Writes an ERROR_OFFSET chunk in <paramref name="request"/>'s form.</summary>
    public static int WriteErrorOffset(Span<byte> destination, ReplyFlags flags, in NbdRequest request, NbdError error, string? message, ulong offset) =>
        WriteError(destination, flags, ChunkTarget.For(request), error, message, offset);

    private static int WriteOffsetDataPrefix(Span<byte> destination, ReplyFlags flags, ChunkTarget target, ulong offset, int dataLength)
    {
        // dataLength is an int, so it can never reach the 2^32 - 8 bound that forces a split.
        ArgumentOutOfRangeException.ThrowIfLessThan(dataLength, 1);

        var position = target.WriteHeader(destination, flags, ReplyType.OffsetData, (uint)dataLength + OffsetDataFixedPayload);
        BinaryPrimitives.WriteUInt64BigEndian(destination[position..], offset);
        return position + OffsetDataFixedPayload;
    }

    private static int WriteOffsetHole(Span<byte> destination, ReplyFlags flags, ChunkTarget target, ulong offset, uint holeSize)
    {
        if (holeSize == 0)
        {
            throw new ArgumentOutOfRangeException(nameof(holeSize), "A hole chunk must describe at least one byte.");
        }

        var position = target.WriteHeader(destination, flags, ReplyType.OffsetHole, OffsetHolePayload);
        BinaryPrimitives.WriteUInt64BigEndian(destination[position..], offset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[(position + 8)..], holeSize);
        return position + OffsetHolePayload;
    }

    /// <summary>ERROR (no <paramref name="errorOffset"/>) or ERROR_OFFSET: u32 error, u16 message length, message, [u64 offset].</summary>
    private static int WriteError(Span<byte> destination, ReplyFlags flags, ChunkTarget target, NbdError error, string? message, ulong? errorOffset)
    {
        if (error == NbdError.None)
        {
            throw new ArgumentOutOfRangeException(nameof(error), "An error chunk must carry a non-zero error.");
        }

        var headerLength = HeaderLength(target.Extended);
        var messageLength = WriteMessage(destination[(headerLength + ErrorFixedPayload)..], message);
        var payloadLength = ErrorFixedPayload + messageLength + (errorOffset is null ? 0 : 8);
        target.WriteHeader(destination, flags, errorOffset is null ? ReplyType.Error : ReplyType.ErrorOffset, (uint)payloadLength);
        BinaryPrimitives.WriteUInt32BigEndian(destination[headerLength..], (uint)error);
        BinaryPrimitives.WriteUInt16BigEndian(destination[(headerLength + 4)..], (ushort)messageLength);
        if (errorOffset is { } offset)
        {
            BinaryPrimitives.WriteUInt64BigEndian(destination[(headerLength + ErrorFixedPayload + messageLength)..], offset);
        }

        return headerLength + payloadLength;
    }

    /// <summary>Whom a chunk answers and in which form: the three things a chunk header needs beyond flags and type.</summary>
    private readonly record struct ChunkTarget(ulong Cookie, ulong RequestOffset, bool Extended)
    {
        public static ChunkTarget Structured(ulong cookie) => new(cookie, 0, false);

        public static ChunkTarget For(in NbdRequest request) => new(request.Cookie, request.Offset, request.IsExtended);

        public int WriteHeader(Span<byte> destination, ReplyFlags flags, ReplyType type, uint payloadLength) => Extended
            ? ExtendedReplyHeader.Write(destination, flags, type, Cookie, RequestOffset, payloadLength)
            : StructuredReplyHeader.Write(destination, flags, type, Cookie, payloadLength);
    }
}
