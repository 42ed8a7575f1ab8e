using System.Buffers.Binary;

namespace Spindle.Protocol;

/// <summary>
/// The payload a client may send with NBD_CMD_BLOCK_STATUS and NBD_CMD_FLAG_PAYLOAD_LEN, when the server advertised
/// NBD_FLAG_BLOCK_STATUS_PAYLOAD (only possible with extended headers), to have only some of the negotiated
/// metadata contexts answered. The request header's length is then the payload size and the effect length is here.
/// </summary>
/// <remarks>
/// extension-ext-header proto.md, "NBD_CMD_BLOCK_STATUS"; the reference sheet §8:
/// <code>
///  0                       8            12           12 + 4(n-1)
///  +-----------------------+------------+-----  ...  -+------------+
///  | effect length (u64)   | context id | context id   | context id |   8 + 4 n bytes, n ≥ 1
///  +-----------------------+------------+-----  ...  -+------------+
/// </code>
/// Whose check is what: <see cref="TryRead"/> refuses a length that is not 8 + 4 n, more ids than
/// <c>maxContextIds</c>, and duplicate ids; the caller refuses ids it never assigned and a zero effect length. Either
/// way the spec's answer is the same: the server has already consumed the payload (its size came with the header)
/// and replies EINVAL, so the stream stays in step.
/// </remarks>
public sealed record BlockStatusPayload(ulong EffectLength, IReadOnlyList<uint> ContextIds)
{
    /// <summary>The effect length that starts the payload.</summary>
    public const int FixedLength = 8;

    private const int EffectLengthOffset = 0;
    private const int ContextIdsOffset = 8;
    private const int ContextIdLength = 4;

    /// <summary>The payload size for <paramref name="contextIdCount"/> ids.</summary>
    public static int LengthFor(int contextIdCount) => FixedLength + (ContextIdLength * contextIdCount);

    /// <summary>Writes the payload and returns the number of bytes written (8 + 4 n).</summary>
    public static int Write(Span<byte> destination, ulong effectLength, ReadOnlySpan<uint> contextIds)
    {
        if (contextIds.IsEmpty)
        {
            throw new ArgumentException("A block status payload names at least one metadata context.", nameof(contextIds));
        }

        var length = LengthFor(contextIds.Length);
        var payload = destination[..length];
        BinaryPrimitives.WriteUInt64BigEndian(payload[EffectLengthOffset..], effectLength);
        for (var i = 0; i < contextIds.Length; i++)
        {
            BinaryPrimitives.WriteUInt32BigEndian(payload[(ContextIdsOffset + (i * ContextIdLength))..], contextIds[i]);
        }

        return length;
    }

    /// <summary>
    /// Parses a payload of <paramref name="payloadLength"/> bytes (the request header's length). The shape is checked
    /// before any byte is needed: the length must be 8 + 4 n with 1 ≤ n ≤ <paramref name="maxContextIds"/> (pass the
    /// number of contexts negotiated: more ids than that must repeat or invent one), else
    /// <see cref="ParseStatus.Invalid"/> with <paramref name="problem"/> saying why. Then
    /// <see cref="ParseStatus.NeedMoreData"/> until the whole payload is in <paramref name="source"/>; then a repeated
    /// id is <see cref="ParseStatus.Invalid"/> too.
    /// </summary>
    public static ParseStatus TryRead(ReadOnlySpan<byte> source, ulong payloadLength, int maxContextIds, out BlockStatusPayload? payload, out string? problem)
    {
        payload = null;
        problem = null;
        if (payloadLength < FixedLength + ContextIdLength || (payloadLength - FixedLength) % ContextIdLength != 0)
        {
            problem = $"a block status payload of {payloadLength} bytes (it must be 8 + 4 n, n >= 1)";
            return ParseStatus.Invalid;
        }

        var count = (payloadLength - FixedLength) / ContextIdLength;
        if (count > (ulong)Math.Max(maxContextIds, 0))
        {
            problem = $"a block status payload naming {count} metadata contexts, more than the {maxContextIds} negotiated";
            return ParseStatus.Invalid;
        }

        if ((ulong)source.Length < payloadLength)
        {
            return ParseStatus.NeedMoreData;
        }

        var ids = new uint[(int)count];
        for (var i = 0; i < ids.Length; i++)
        {
            ids[i] = BinaryPrimitives.ReadUInt32BigEndian(source[(ContextIdsOffset + (i * ContextIdLength))..]);
        }

        var sorted = (uint[])ids.Clone();
        Array.Sort(sorted);
        for (var i = 1; i < sorted.Length; i++)
        {
            if (sorted[i] == sorted[i - 1])
            {
                problem = $"a block status payload naming metadata context {sorted[i]} twice";
                return ParseStatus.Invalid;
            }
        }

        payload = new BlockStatusPayload(BinaryPrimitives.ReadUInt64BigEndian(source[EffectLengthOffset..]), ids);
        return ParseStatus.Done;
    }
}
