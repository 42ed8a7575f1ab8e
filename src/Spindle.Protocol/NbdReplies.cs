using System.Buffers.Binary;
using System.Text;

namespace Spindle.Protocol;

/// <summary>
/// A simple reply header (16 bytes), followed by the data of a successful READ when structured replies are off.
/// </summary>
/// <remarks>
/// <code>
///  0               4               8                               16
///  +---------------+---------------+-------------------------------+
///  | 0x67446698    | error (u32)   | cookie (u64)                  |
///  +---------------+---------------+-------------------------------+
/// </code>
/// </remarks>
public readonly record struct SimpleReply(NbdError Error, ulong Cookie)
{
    public const int Length = NbdLimits.SimpleReplyHeaderLength;

    public static int Write(Span<byte> destination, NbdError error, ulong cookie)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.SimpleReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], (uint)error);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], cookie);
        return Length;
    }

    /// <summary>Parses a simple reply header; the caller has already checked the magic's first four bytes or lets this do it.</summary>
    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out SimpleReply reply)
    {
        reply = default;
        if (source.Length < Length)
        {
            return ParseStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt32BigEndian(source) != NbdMagic.SimpleReplyMagic)
        {
            return ParseStatus.Invalid;
        }

        reply = new SimpleReply(
            (NbdError)BinaryPrimitives.ReadUInt32BigEndian(source[4..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[8..]));
        return ParseStatus.Done;
    }
}

/// <summary>
/// A structured reply chunk header (20 bytes), followed by <see cref="PayloadLength"/> bytes.
/// </summary>
/// <remarks>
/// <code>
///  0               4       6       8                               16              20
///  +---------------+-------+-------+-------------------------------+---------------+
///  | 0x668e33ef    | flags | type  | cookie (u64)                  | length (u32)  |
///  +---------------+-------+-------+-------------------------------+---------------+
/// </code>
/// </remarks>
public readonly record struct StructuredReplyHeader(ReplyFlags Flags, ReplyType Type, ulong Cookie, uint PayloadLength)
{
    public const int Length = NbdLimits.StructuredReplyHeaderLength;

    public bool IsDone => (Flags & ReplyFlags.Done) != 0;

    public bool IsError => ((ushort)Type & 0x8000) != 0;

    public static int Write(Span<byte> destination, ReplyFlags flags, ReplyType type, ulong cookie, uint payloadLength)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.StructuredReplyMagic);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], (ushort)flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], cookie);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], payloadLength);
        return Length;
    }

    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out StructuredReplyHeader header)
    {
        header = default;
        if (source.Length < Length)
        {
            return ParseStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt32BigEndian(source) != NbdMagic.StructuredReplyMagic)
        {
            return ParseStatus.Invalid;
        }

        header = new StructuredReplyHeader(
            (ReplyFlags)BinaryPrimitives.ReadUInt16BigEndian(source[4..]),
            (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(source[6..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[16..]));
        return ParseStatus.Done;
    }
}

/// <summary>
/// Writers and readers for reply chunks. The overloads taking a cookie write the structured form (20-byte header);
/// those taking the <see cref="NbdRequest"/> being answered write the form that request was sent in (structured for a
/// compact request, extended for an extended one: both are fixed by NBD_OPT_EXTENDED_HEADERS), echoing its cookie and,
/// in the extended form, its offset. The payload after the header is the same in both forms.
/// </summary>
public static partial class StructuredReplyChunks
{
    /// <summary>Length of a NONE chunk: header only.</summary>
    public const int NoneLength = StructuredReplyHeader.Length;

    /// <summary>Header plus the 8-byte offset that precedes OFFSET_DATA's data.</summary>
    public const int OffsetDataPrefixLength = StructuredReplyHeader.Length + OffsetDataFixedPayload;

    /// <summary>Header plus offset and hole size.</summary>
    public const int OffsetHoleLength = StructuredReplyHeader.Length + OffsetHolePayload;

    /// <summary>An ERROR chunk's fixed part: header, error, message length.</summary>
    public const int ErrorFixedLength = StructuredReplyHeader.Length + ErrorFixedPayload;

    // Payload sizes, the same in structured and extended chunks (proto.md, "Structured reply types").
    private const int OffsetDataFixedPayload = 8;
    private const int OffsetHolePayload = 12;
    private const int ErrorFixedPayload = 6;

    /// <summary>Writes a NONE chunk with DONE set (the only legal form).</summary>
    public static int WriteNone(Span<byte> destination, ulong cookie) =>
        StructuredReplyHeader.Write(destination, ReplyFlags.Done, ReplyType.None, cookie, 0);

    /// <summary>
    /// Writes the header and offset of an OFFSET_DATA chunk whose <paramref name="dataLength"/> data bytes the
    /// caller sends next (so large payloads go out straight from their buffer).
    /// </summary>
    public static int WriteOffsetDataPrefix(Span<byte> destination, ReplyFlags flags, ulong cookie, ulong offset, int dataLength) =>
        WriteOffsetDataPrefix(destination, flags, ChunkTarget.Structured(cookie), offset, dataLength);

    public static int WriteOffsetHole(Span<byte> destination, ReplyFlags flags, ulong cookie, ulong offset, uint holeSize) =>
        WriteOffsetHole(destination, flags, ChunkTarget.Structured(cookie), offset, holeSize);

    /// <summary>The bytes an ERROR chunk with this message takes (the message is cut at 4096 bytes).</summary>
    public static int ErrorLength(string? message) => ErrorFixedLength + MessageByteCount(message);

    /// <summary>The bytes an ERROR_OFFSET chunk with this message takes.</summary>
    public static int ErrorOffsetLength(string? message) => ErrorFixedLength + MessageByteCount(message) + 8;

    /// <summary>Writes an ERROR chunk (with DONE set) carrying an optional human-readable message.</summary>
    public static int WriteError(Span<byte> destination, ReplyFlags flags, ulong cookie, NbdError error, string? message) =>
        WriteError(destination, flags, ChunkTarget.Structured(cookie), error, message, errorOffset: null);

    /// <summary>Writes an ERROR_OFFSET chunk naming the offset (inside the request) where the error happened.</summary>
    public static int WriteErrorOffset(Span<byte> destination, ReplyFlags flags, ulong cookie, NbdError error, string? message, ulong offset) =>
        WriteError(destination, flags, ChunkTarget.Structured(cookie), error, message, offset);

    /// <summary>The bytes a BLOCK_STATUS chunk with <paramref name="extentCount"/> extents takes, header included.</summary>
    public static int BlockStatusLength(int extentCount) => StructuredReplyHeader.Length + 4 + (8 * extentCount);

    /// <summary>
    /// Writes a BLOCK_STATUS chunk (type 5): the context id, then one (length, flags) pair per extent.
    /// </summary>
    public static int WriteBlockStatus(Span<byte> destination, ReplyFlags flags, ulong cookie, uint contextId, ReadOnlySpan<BlockStatusExtent> extents)
    {
        if (extents.IsEmpty)
        {
            throw new ArgumentException("A block status chunk needs at least one extent.", nameof(extents));
        }

        var position = WriteBlockStatusHeader(destination, flags, cookie, contextId, extents.Length);
        foreach (var extent in extents)
        {
            if (extent.Length == 0)
            {
                throw new ArgumentException("Block status extents must have a non-zero length.", nameof(extents));
            }

            BinaryPrimitives.WriteUInt32BigEndian(destination[position..], extent.Length);
            BinaryPrimitives.WriteUInt32BigEndian(destination[(position + 4)..], extent.Flags);
            position += 8;
        }

        return position;
    }

    /// <summary>
    /// Writes the header and context id of a BLOCK_STATUS chunk whose <paramref name="extentCount"/> (length, flags)
    /// pairs the caller writes right after it.
    /// </summary>
    public static int WriteBlockStatusHeader(Span<byte> destination, ReplyFlags flags, ulong cookie, uint contextId, int extentCount)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(extentCount, 1);
        StructuredReplyHeader.Write(destination, flags, ReplyType.BlockStatus, cookie, (uint)(4 + (8 * extentCount)));
        BinaryPrimitives.WriteUInt32BigEndian(destination[20..], contextId);
        return StructuredReplyHeader.Length + 4;
    }

    /// <summary>Parses an ERROR or ERROR_OFFSET payload (without the chunk header).</summary>
    public static bool TryReadError(ReadOnlySpan<byte> payload, ReplyType type, out NbdError error, out string message, out ulong? offset)
    {
        error = default;
        message = string.Empty;
        offset = null;
        if (payload.Length < 6)
        {
            return false;
        }

        error = (NbdError)BinaryPrimitives.ReadUInt32BigEndian(payload);
        int messageLength = BinaryPrimitives.ReadUInt16BigEndian(payload[4..]);
        var trailer = type == ReplyType.ErrorOffset ? 8 : 0;
        if (6 + messageLength + trailer > payload.Length)
        {
            return false;
        }

        message = Encoding.UTF8.GetString(payload.Slice(6, messageLength));
        if (type == ReplyType.ErrorOffset)
        {
            offset = BinaryPrimitives.ReadUInt64BigEndian(payload[(6 + messageLength)..]);
        }

        return true;
    }

    private static int MessageByteCount(string? message) =>
        string.IsNullOrEmpty(message) ? 0 : Math.Min(Encoding.UTF8.GetByteCount(message), NbdLimits.MaxStringLength);

    private static int WriteMessage(Span<byte> destination, string? message)
    {
        if (string.IsNullOrEmpty(message))
        {
            return 0;
        }

        var count = MessageByteCount(message);
        if (count == Encoding.UTF8.GetByteCount(message))
        {
            return Encoding.UTF8.GetBytes(message, destination);
        }

        // Over-long message: cut it on a character boundary so the string stays valid UTF-8.
        var encoder = Encoding.UTF8.GetEncoder();
        encoder.Convert(message, destination[..count], flush: true, out _, out var bytesUsed, out _);
        return bytesUsed;
    }
}

/// <summary>One block status descriptor: a run of <see cref="Length"/> bytes sharing <see cref="Flags"/>.</summary>
public readonly record struct BlockStatusExtent(uint Length, uint Flags);
