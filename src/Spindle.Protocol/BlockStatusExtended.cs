using System.Buffers.Binary;

namespace Spindle.Protocol;

/// <summary>
/// One BLOCK_STATUS_EXT descriptor: a run of <see cref="Length"/> bytes sharing a 64-bit <see cref="Status"/>
/// (for 32-bit contexts such as <c>base:allocation</c> the top 32 bits MUST be zero).
/// </summary>
public readonly record struct ExtendedBlockStatusExtent(ulong Length, ulong Status);

/// <summary>The BLOCK_STATUS_EXT chunk (type 6), used only once extended headers are negotiated.</summary>
/// <remarks>
/// Payload (extension-ext-header proto.md, "NBD_REPLY_TYPE_BLOCK_STATUS_EXT"; the reference sheet §8), after the
/// 32-byte extended chunk header:
/// <code>
///  0            4            8                       16                      24
///  +------------+------------+-----------------------+-----------------------+
///  | context id | count n    | extent length (u64)   | status (u64)          |  ... n descriptors of 16 bytes
///  | u32        | u32        | MUST be nonzero       |                       |
///  +------------+------------+-----------------------+-----------------------+
/// </code>
/// The payload length MUST be 8 + 16 n with n ≥ 1. A count of 0 means "as many as the length says"; any other
/// count MUST equal n. Spindle always writes the true count.
/// </remarks>
public static partial class StructuredReplyChunks
{
    private const int ExtendedStatusContextOffset = 0;
    private const int ExtendedStatusCountOffset = 4;
    private const int ExtendedStatusPrefixPayload = 8;
    private const int ExtendedDescriptorLength = 16;
    private const int ExtendedDescriptorStatusOffset = 8;

    /// <summary>The bytes the fixed part of a BLOCK_STATUS_EXT payload takes: context id and descriptor count.</summary>
    public const int BlockStatusExtendedPrefixPayloadLength = ExtendedStatusPrefixPayload;

    /// <summary>The bytes one BLOCK_STATUS_EXT descriptor takes.</summary>
    public const int BlockStatusExtendedDescriptorLength = ExtendedDescriptorLength;

    /// <summary>The bytes a BLOCK_STATUS_EXT chunk with <paramref name="extentCount"/> descriptors takes, header included.</summary>
    public static int BlockStatusExtendedLength(int extentCount) =>
        ExtendedReplyHeader.Length + ExtendedStatusPrefixPayload + (ExtendedDescriptorLength * extentCount);

    /// <summary>Writes a whole BLOCK_STATUS_EXT chunk answering the extended <paramref name="request"/>.</summary>
    public static int WriteBlockStatusExtended(Span<byte> destination, ReplyFlags flags, in NbdRequest request, uint contextId, ReadOnlySpan<ExtendedBlockStatusExtent> extents)
    {
        if (extents.IsEmpty)
        {
            throw new ArgumentException("A block status chunk needs at least one extent.", nameof(extents));
        }

        var position = WriteBlockStatusExtendedHeader(destination, flags, request, contextId, extents.Length);
        foreach (var extent in extents)
        {
            position += WriteBlockStatusExtendedDescriptor(destination[position..], extent);
        }

        return position;
    }

    /// <summary>
    /// Writes the chunk header, context id and count of a BLOCK_STATUS_EXT chunk whose <paramref name="extentCount"/>
    /// descriptors the caller writes right after it (with <see cref="WriteBlockStatusExtendedDescriptor"/>).
    /// </summary>
    public static int WriteBlockStatusExtendedHeader(Span<byte> destination, ReplyFlags flags, in NbdRequest request, uint contextId, int extentCount)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(extentCount, 1);
        if (!request.IsExtended)
        {
            throw new ArgumentException("BLOCK_STATUS_EXT MUST NOT be sent unless extended headers were negotiated.", nameof(request));
        }

        var payloadLength = (ulong)(ExtendedStatusPrefixPayload + (ExtendedDescriptorLength * (long)extentCount));
        var position = ExtendedReplyHeader.Write(destination, flags, ReplyType.BlockStatusExtended, request.Cookie, request.Offset, payloadLength);
        BinaryPrimitives.WriteUInt32BigEndian(destination[(position + ExtendedStatusContextOffset)..], contextId);
        BinaryPrimitives.WriteUInt32BigEndian(destination[(position + ExtendedStatusCountOffset)..], (uint)extentCount);
        return position + ExtendedStatusPrefixPayload;
    }

    /// <summary>Writes one 16-byte descriptor (u64 length, u64 status); the length MUST be nonzero.</summary>
    public static int WriteBlockStatusExtendedDescriptor(Span<byte> destination, ExtendedBlockStatusExtent extent)
    {
        if (extent.Length == 0)
        {
            throw new ArgumentException("Block status extents must have a non-zero length.", nameof(extent));
        }

        BinaryPrimitives.WriteUInt64BigEndian(destination, extent.Length);
        BinaryPrimitives.WriteUInt64BigEndian(destination[ExtendedDescriptorStatusOffset..], extent.Status);
        return ExtendedDescriptorLength;
    }

    /// <summary>
    /// Parses the start of a BLOCK_STATUS_EXT payload of <paramref name="payloadLength"/> bytes (from the chunk
    /// header): context id and descriptor count. The length is checked first, before any payload is needed: it
    /// must be 8 + 16 n with 1 ≤ n ≤ <paramref name="maxDescriptors"/>, else <see cref="ParseStatus.Invalid"/>.
    /// A nonzero count that is not n is <see cref="ParseStatus.Invalid"/>; <paramref name="descriptorCount"/> is n.
    /// </summary>
    public static ParseStatus TryReadBlockStatusExtendedPrefix(ReadOnlySpan<byte> source, ulong payloadLength, int maxDescriptors, out uint contextId, out int descriptorCount)
    {
        contextId = 0;
        descriptorCount = 0;
        if (payloadLength < ExtendedStatusPrefixPayload + ExtendedDescriptorLength
            || (payloadLength - ExtendedStatusPrefixPayload) % ExtendedDescriptorLength != 0
            || (payloadLength - ExtendedStatusPrefixPayload) / ExtendedDescriptorLength > (ulong)Math.Max(maxDescriptors, 0))
        {
            return ParseStatus.Invalid;
        }

        if (source.Length < ExtendedStatusPrefixPayload)
        {
            return ParseStatus.NeedMoreData;
        }

        var described = (int)((payloadLength - ExtendedStatusPrefixPayload) / ExtendedDescriptorLength);
        var count = BinaryPrimitives.ReadUInt32BigEndian(source[ExtendedStatusCountOffset..]);
        if (count != 0 && count != (uint)described)
        {
            return ParseStatus.Invalid;
        }

        contextId = BinaryPrimitives.ReadUInt32BigEndian(source[ExtendedStatusContextOffset..]);
        descriptorCount = described;
        return ParseStatus.Done;
    }

    /// <summary>Parses one 16-byte descriptor; a zero length is <see cref="ParseStatus.Invalid"/> ("MUST be nonzero").</summary>
    public static ParseStatus TryReadBlockStatusExtendedDescriptor(ReadOnlySpan<byte> source, out ExtendedBlockStatusExtent extent)
    {
        extent = default;
        if (source.Length < ExtendedDescriptorLength)
        {
            return ParseStatus.NeedMoreData;
        }

        var length = BinaryPrimitives.ReadUInt64BigEndian(source);
        if (length == 0)
        {
            return ParseStatus.Invalid;
        }

        extent = new ExtendedBlockStatusExtent(length, BinaryPrimitives.ReadUInt64BigEndian(source[ExtendedDescriptorStatusOffset..]));
        return ParseStatus.Done;
    }

    /// <summary>
    /// Parses a whole BLOCK_STATUS_EXT payload of <paramref name="payloadLength"/> bytes: the limits of
    /// <see cref="TryReadBlockStatusExtendedPrefix"/> first, then <see cref="ParseStatus.NeedMoreData"/> until the whole
    /// payload is in <paramref name="source"/>, then every descriptor.
    /// </summary>
    public static ParseStatus TryReadBlockStatusExtended(ReadOnlySpan<byte> source, ulong payloadLength, int maxDescriptors, out uint contextId, out ExtendedBlockStatusExtent[] extents)
    {
        extents = [];
        var status = TryReadBlockStatusExtendedPrefix(source, payloadLength, maxDescriptors, out contextId, out var count);
        if (status != ParseStatus.Done)
        {
            return status;
        }

        if ((ulong)source.Length < payloadLength)
        {
            contextId = 0;
            return ParseStatus.NeedMoreData;
        }

        var parsed = new ExtendedBlockStatusExtent[count];
        for (var i = 0; i < count; i++)
        {
            if (TryReadBlockStatusExtendedDescriptor(source[(ExtendedStatusPrefixPayload + (i * ExtendedDescriptorLength))..], out parsed[i]) != ParseStatus.Done)
            {
                contextId = 0;
                return ParseStatus.Invalid;
            }
        }

        extents = parsed;
        return ParseStatus.Done;
    }
}
