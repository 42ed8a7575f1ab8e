using System.Buffers.Binary;
using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The BLOCK_STATUS request payload a server reads with extended headers (NBD_FLAG_BLOCK_STATUS_PAYLOAD: u64 effect
/// length, n x u32 context id). The input is <c>u8 mode | u32 max ids | u64 payload length | payload</c>; mode bit 0
/// takes the length from the bytes that follow. Invariant: no exception; the shape is refused before any byte is
/// needed; a parsed payload has 1..max distinct ids and writes back to the same bytes; a refusal says why.
/// </summary>
[Covers(typeof(BlockStatusPayload), nameof(BlockStatusPayload.TryRead))]
public sealed class BlockStatusPayloads : FuzzTarget
{
    private const int Fixed = 13;

    public override void Run(byte[] input)
    {
        if (input.Length < Fixed)
        {
            return;
        }

        var max = (int)(BinaryPrimitives.ReadUInt32BigEndian(input.AsSpan(1)) & 0x7fff_ffff) - 1;
        var source = input.AsSpan(Fixed);
        var payloadLength = (input[0] & 1) != 0 ? (ulong)source.Length : BinaryPrimitives.ReadUInt64BigEndian(input.AsSpan(5));
        var status = BlockStatusPayload.TryRead(source, payloadLength, max, out var payload, out var problem);
        var shapeOk = payloadLength >= 12 && (payloadLength - 8) % 4 == 0 && (payloadLength - 8) / 4 <= (ulong)Math.Max(max, 0);
        Check.That(shapeOk || status == ParseStatus.Invalid, $"payload length {payloadLength} (max {max}) gave {status}");
        Check.That((status == ParseStatus.Invalid) == (problem is not null), $"{status} with problem '{problem}'");
        Check.That(status != ParseStatus.NeedMoreData || (ulong)source.Length < payloadLength, $"need more data with {source.Length} of {payloadLength} bytes");
        if (status != ParseStatus.Done)
        {
            return;
        }

        var ids = payload!.ContextIds.ToArray();
        Check.That(ids.Length >= 1 && ids.Length <= max && ids.Distinct().Count() == ids.Length, $"{ids.Length} context ids (max {max}), distinct {ids.Distinct().Count()}");
        var written = new byte[BlockStatusPayload.LengthFor(ids.Length)];
        BlockStatusPayload.Write(written, payload.EffectLength, ids);
        Check.Same(source[..(int)payloadLength], written, "block status payload rewritten");
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var payload = new byte[BlockStatusPayload.LengthFor(2)];
        BlockStatusPayload.Write(payload, 1 << 20, [1, 2]);
        yield return ("two-contexts", [1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, .. payload]);
        yield return ("repeated-context", [1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, .. payload[..12], .. payload[8..12]]);
    }
}
