using System.Buffers.Binary;
using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The BLOCK_STATUS_EXT chunk payload (proto.md "Extended headers"): its prefix, one descriptor and the whole payload.
/// The input is <c>u8 mode | u32 max descriptors | u64 payload length | payload bytes</c>; mode bit 0 takes the
/// payload length from the bytes that follow instead, so both a consistent and a lying header are tried.
/// Invariant: no exception; the length limits hold before any byte is needed; the whole-payload reader agrees with
/// the prefix and descriptor readers; a parsed payload writes back to the same bytes.
/// </summary>
[Covers(typeof(StructuredReplyChunks), nameof(StructuredReplyChunks.TryReadBlockStatusExtendedPrefix))]
[Covers(typeof(StructuredReplyChunks), nameof(StructuredReplyChunks.TryReadBlockStatusExtendedDescriptor))]
[Covers(typeof(StructuredReplyChunks), nameof(StructuredReplyChunks.TryReadBlockStatusExtended))]
public sealed class BlockStatusChunks : FuzzTarget
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
        var prefix = StructuredReplyChunks.TryReadBlockStatusExtendedPrefix(source, payloadLength, max, out var prefixContext, out var count);
        var whole = StructuredReplyChunks.TryReadBlockStatusExtended(source, payloadLength, max, out var context, out var extents);
        var shapeOk = payloadLength >= 24 && (payloadLength - 8) % 16 == 0 && (payloadLength - 8) / 16 <= (ulong)Math.Max(max, 0);
        if (!shapeOk)
        {
            Check.That(prefix == ParseStatus.Invalid && whole == ParseStatus.Invalid, $"payload length {payloadLength} (max {max}) gave {prefix}/{whole}");
            return;
        }

        Check.That(prefix != ParseStatus.Done || (ulong)count == (payloadLength - 8) / 16, $"prefix counted {count} descriptors in {payloadLength} bytes");
        if (prefix != ParseStatus.Done)
        {
            Check.That(whole == prefix, $"prefix {prefix} but whole payload {whole}");
            return;
        }

        if ((ulong)source.Length < payloadLength)
        {
            Check.That(whole == ParseStatus.NeedMoreData, $"whole payload parsed from {source.Length} of {payloadLength} bytes");
            return;
        }

        var descriptorsOk = true;
        for (var i = 0; i < count; i++)
        {
            var one = StructuredReplyChunks.TryReadBlockStatusExtendedDescriptor(source[(8 + (16 * i))..], out var extent);
            descriptorsOk &= one == ParseStatus.Done;
            if (one == ParseStatus.Done)
            {
                Check.That(extent.Length != 0, "a descriptor of length 0 parsed");
            }
        }

        Check.That(whole == (descriptorsOk ? ParseStatus.Done : ParseStatus.Invalid), $"whole payload {whole}, descriptors {(descriptorsOk ? "all valid" : "not all valid")}");
        if (whole != ParseStatus.Done)
        {
            return;
        }

        Check.That(context == prefixContext && extents.Length == count, "whole payload and prefix disagree");
        var buffer = new byte[16];
        for (var i = 0; i < count; i++)
        {
            StructuredReplyChunks.WriteBlockStatusExtendedDescriptor(buffer, extents[i]);
            Check.Same(source.Slice(8 + (16 * i), 16), buffer, $"descriptor {i} rewritten");
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var payload = new byte[8 + 32];
        BinaryPrimitives.WriteUInt32BigEndian(payload, 1);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(4), 2);
        StructuredReplyChunks.WriteBlockStatusExtendedDescriptor(payload.AsSpan(8), new ExtendedBlockStatusExtent(1 << 20, 0));
        StructuredReplyChunks.WriteBlockStatusExtendedDescriptor(payload.AsSpan(24), new ExtendedBlockStatusExtent(1UL << 33, 3));
        yield return ("two-descriptors", [1, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0, .. payload]);
        yield return ("length-from-header", [0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 40, .. payload]);
    }
}
