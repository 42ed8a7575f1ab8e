using Spindle.Protocol;
using Xunit;

namespace Spindle.Protocol.Tests;

/// <summary>
/// The NBD_OPT_EXTENDED_HEADERS layouts (extension-ext-header proto.md; the reference sheet §8) checked against bytes
/// written out by hand from the spec's field lists, all big-endian.
/// </summary>
public sealed class ExtendedHeaderGoldenBytesTests
{
    private const string Cookie = "0102030405060708";

    [Fact]
    public void Extension_constants_match_the_spec()
    {
        Assert.Equal(0x21e41c71u, NbdMagic.ExtendedRequestMagic);
        Assert.Equal(0x6e8a278cu, NbdMagic.ExtendedReplyMagic);
        Assert.Equal(11u, (uint)NbdOption.ExtendedHeaders);
        Assert.Equal(0x8000000au, (uint)OptionReplyType.ErrorExtendedHeaderRequired);
        Assert.Equal(0x1000, (int)TransmissionFlags.BlockStatusPayload);
        Assert.Equal(0x20, (int)CommandFlags.PayloadLength);
        Assert.Equal(6, (int)ReplyType.BlockStatusExtended);
        Assert.Equal(32, NbdLimits.ExtendedRequestHeaderLength);
        Assert.Equal(32, ExtendedReplyHeader.Length);
    }

    [Fact]
    public void Extended_write_is_32_bytes_with_a_64_bit_payload_length()
    {
        var request = new NbdRequest(CommandFlags.Fua | CommandFlags.PayloadLength, NbdCommand.Write, 0x0102030405060708, 0x1122334455667788, 0x10000, extended: true);
        var bytes = new byte[32];
        Assert.Equal(32, request.WriteTo(bytes));
        Assert.Equal(Hex("21e41c71" + "0021" + "0001" + Cookie + "1122334455667788" + "0000000000010000"), bytes);

        Assert.Equal(ParseStatus.Done, NbdRequest.TryRead(bytes, extended: true, out var parsed));
        Assert.Equal(request, parsed);
        Assert.True(parsed.IsExtended);
        Assert.Equal(32, parsed.HeaderLength);
        Assert.True(parsed.HasPayload);
        Assert.Equal(65536, parsed.PayloadLength);
        Assert.Equal(65536ul, parsed.WirePayloadLength);
    }

    [Fact]
    public void Extended_trim_carries_a_64_bit_effect_length_and_no_payload()
    {
        var bytes = Hex("21e41c71" + "0000" + "0004" + Cookie + "0000000000100000" + "0000000500000000");
        Assert.Equal(ParseStatus.Done, NbdRequest.TryRead(bytes, extended: true, out var request));
        Assert.Equal((NbdCommand.Trim, 0x100000ul, 0x500000000ul), (request.Command, request.Offset, request.LongLength));
        Assert.False(request.HasPayload);
        Assert.Equal(0ul, request.WirePayloadLength);

        // The compact view never under-reports: a length past 32 bits reads as the largest, so size checks refuse it.
        Assert.Equal(uint.MaxValue, request.Length);

        var written = new byte[32];
        request.WriteTo(written);
        Assert.Equal(bytes, written);
    }

    [Fact]
    public void Extended_payload_follows_the_flag_not_the_command()
    {
        // WRITE carries its payload with PAYLOAD_LEN or without it, as qemu's client sends it (see HasPayload)...
        var write = new NbdRequest(CommandFlags.None, NbdCommand.Write, 1, 0, 4096, extended: true);
        Assert.Equal((true, 4096), (write.HasPayload, write.PayloadLength));

        // ...and BLOCK_STATUS with it carries its payload.
        var blockStatus = new NbdRequest(CommandFlags.PayloadLength, NbdCommand.BlockStatus, 1, 0, 16, extended: true);
        Assert.Equal((true, 16), (blockStatus.HasPayload, blockStatus.PayloadLength));

        // A compact request keeps the compact rule, flag or not: only WRITE carries a payload.
        Assert.False(new NbdRequest(CommandFlags.PayloadLength, NbdCommand.BlockStatus, 1, 0, 16).HasPayload);
        Assert.Equal(4096, new NbdRequest(CommandFlags.None, NbdCommand.Write, 1, 0, 4096).PayloadLength);
    }

    [Fact]
    public void Each_mode_refuses_the_other_magic_and_waits_for_its_whole_header()
    {
        var extended = Hex("21e41c71" + "0000" + "0000" + Cookie + "0000000000000000" + "0000000000000200");
        var compact = Hex("25609513" + "0000" + "0000" + Cookie + "0000000000000000" + "00000200");

        Assert.Equal(ParseStatus.Invalid, NbdRequest.TryRead(extended, extended: false, out _));
        Assert.Equal(ParseStatus.Invalid, NbdRequest.TryRead(compact.Concat(new byte[4]).ToArray(), extended: true, out _));
        Assert.Equal(ParseStatus.NeedMoreData, NbdRequest.TryRead(extended.AsSpan(0, 31), extended: true, out _));
        Assert.Equal(ParseStatus.Done, NbdRequest.TryRead(compact, extended: false, out var parsed));
        Assert.False(parsed.IsExtended);
        Assert.Equal(28, parsed.HeaderLength);

        extended[3] ^= 0x01;
        Assert.Equal(ParseStatus.Invalid, NbdRequest.TryRead(extended, extended: true, out _));
    }

    [Theory]
    [InlineData(0ul, 0u)]
    [InlineData(1ul, 1u)]
    [InlineData(0xfffffffful, 0xffffffffu)]
    [InlineData(0x1_0000_0000ul, 0xffffffffu)]
    [InlineData(ulong.MaxValue, 0xffffffffu)]
    public void Extended_requests_round_trip_every_length(ulong length, uint compactView)
    {
        var request = new NbdRequest(CommandFlags.None, NbdCommand.WriteZeroes, 42, 0xfffffffffffff000, length, extended: true);
        var bytes = new byte[32];
        request.WriteTo(bytes);
        Assert.Equal(ParseStatus.Done, NbdRequest.TryRead(bytes, extended: true, out var parsed));
        Assert.Equal(request, parsed);
        Assert.Equal(length, parsed.LongLength);
        Assert.Equal(compactView, parsed.Length);
    }

    [Fact]
    public void A_compact_request_cannot_carry_a_64_bit_length()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new NbdRequest(CommandFlags.None, NbdCommand.Trim, 1, 0, 0x1_0000_0000, extended: false));
        var widened = new NbdRequest(CommandFlags.None, NbdCommand.Trim, 1, 0, 4096) with { LongLength = 0x1_0000_0000 };
        Assert.Throws<InvalidOperationException>(() => widened.WriteTo(new byte[32]));
    }

    [Fact]
    public void Extended_reply_header_is_magic_flags_type_cookie_offset_length()
    {
        var bytes = new byte[32];
        Assert.Equal(32, ExtendedReplyHeader.Write(bytes, ReplyFlags.Done, ReplyType.OffsetData, 0x0102030405060708, 0x1122334455667788, 0x208));
        Assert.Equal(Hex("6e8a278c" + "0001" + "0001" + Cookie + "1122334455667788" + "0000000000000208"), bytes);

        Assert.Equal(ParseStatus.Done, ExtendedReplyHeader.TryRead(bytes, out var header));
        Assert.Equal(new ExtendedReplyHeader(ReplyFlags.Done, ReplyType.OffsetData, 0x0102030405060708, 0x1122334455667788, 0x208), header);
        Assert.True(header.IsDone);
        Assert.False(header.IsError);
        Assert.Equal(ParseStatus.NeedMoreData, ExtendedReplyHeader.TryRead(bytes.AsSpan(0, 31), out _));

        // A structured chunk where an extended one is due is out of step.
        var structured = new byte[32];
        StructuredReplyChunks.WriteNone(structured, 1);
        Assert.Equal(ParseStatus.Invalid, ExtendedReplyHeader.TryRead(structured, out _));
    }

    [Fact]
    public void Extended_none_chunk_echoes_the_request_offset()
    {
        var request = Extended(NbdCommand.Flush, offset: 0, length: 0);
        var bytes = new byte[StructuredReplyChunks.NoneLengthFor(extended: true)];
        Assert.Equal(32, StructuredReplyChunks.WriteNone(bytes, request));
        Assert.Equal(Hex("6e8a278c" + "0001" + "0000" + Cookie + "0000000000000000" + "0000000000000000"), bytes);
    }

    [Fact]
    public void Extended_offset_data_prefix_keeps_the_request_offset_in_the_header_and_its_own_in_the_payload()
    {
        var request = Extended(NbdCommand.Read, offset: 0x10000, length: 0x400);
        var bytes = new byte[StructuredReplyChunks.OffsetDataPrefixLengthFor(extended: true)];
        Assert.Equal(40, StructuredReplyChunks.WriteOffsetDataPrefix(bytes, ReplyFlags.None, request, 0x10200, 512));
        Assert.Equal(Hex("6e8a278c" + "0000" + "0001" + Cookie + "0000000000010000" + "0000000000000208" + "0000000000010200"), bytes);
    }

    [Fact]
    public void Extended_offset_hole_keeps_its_32_bit_size()
    {
        var request = Extended(NbdCommand.Read, offset: 0x1000, length: 0x10000);
        var bytes = new byte[StructuredReplyChunks.OffsetHoleLengthFor(extended: true)];
        Assert.Equal(44, StructuredReplyChunks.WriteOffsetHole(bytes, ReplyFlags.Done, request, 0x1000, 0x10000));
        Assert.Equal(Hex("6e8a278c" + "0001" + "0002" + Cookie + "0000000000001000" + "000000000000000c" + "0000000000001000" + "00010000"), bytes);
        Assert.Throws<ArgumentOutOfRangeException>(() => StructuredReplyChunks.WriteOffsetHole(new byte[44], ReplyFlags.Done, request, 0x1000, 0));
    }

    [Fact]
    public void Extended_error_chunks_have_the_structured_payload_after_the_wide_header()
    {
        var request = Extended(NbdCommand.Write, offset: 0x2000, length: 512);
        var error = new byte[StructuredReplyChunks.ErrorLength("bad", extended: true)];
        Assert.Equal(error.Length, StructuredReplyChunks.WriteError(error, ReplyFlags.Done, request, NbdError.InvalidArgument, "bad"));
        Assert.Equal(Hex("6e8a278c" + "0001" + "8001" + Cookie + "0000000000002000" + "0000000000000009" + "00000016" + "0003" + "626164"), error);
        Assert.True(StructuredReplyChunks.TryReadError(error.AsSpan(32), ReplyType.Error, out var code, out var message, out var at));
        Assert.Equal((NbdError.InvalidArgument, "bad", (ulong?)null), (code, message, at));

        var errorOffset = new byte[StructuredReplyChunks.ErrorOffsetLength("io", extended: true)];
        Assert.Equal(errorOffset.Length, StructuredReplyChunks.WriteErrorOffset(errorOffset, ReplyFlags.Done, request, NbdError.IO, "io", 0x2100));
        Assert.Equal(Hex("6e8a278c" + "0001" + "8002" + Cookie + "0000000000002000" + "0000000000000010" + "00000005" + "0002" + "696f" + "0000000000002100"), errorOffset);
        Assert.True(StructuredReplyChunks.TryReadError(errorOffset.AsSpan(32), ReplyType.ErrorOffset, out _, out _, out at));
        Assert.Equal(0x2100ul, at);
    }

    [Fact]
    public void A_compact_request_gets_the_same_structured_bytes_as_the_cookie_overloads()
    {
        var request = new NbdRequest(CommandFlags.None, NbdCommand.Read, 9, 0x200, 512);
        Assert.Equal(Chunk(b => StructuredReplyChunks.WriteNone(b, 9)), Chunk(b => StructuredReplyChunks.WriteNone(b, request)));
        Assert.Equal(
            Chunk(b => StructuredReplyChunks.WriteOffsetDataPrefix(b, ReplyFlags.None, 9, 0x200, 512)),
            Chunk(b => StructuredReplyChunks.WriteOffsetDataPrefix(b, ReplyFlags.None, request, 0x200, 512)));
        Assert.Equal(
            Chunk(b => StructuredReplyChunks.WriteOffsetHole(b, ReplyFlags.Done, 9, 0x200, 512)),
            Chunk(b => StructuredReplyChunks.WriteOffsetHole(b, ReplyFlags.Done, request, 0x200, 512)));
        Assert.Equal(
            Chunk(b => StructuredReplyChunks.WriteErrorOffset(b, ReplyFlags.Done, 9, NbdError.IO, "x", 0x300)),
            Chunk(b => StructuredReplyChunks.WriteErrorOffset(b, ReplyFlags.Done, request, NbdError.IO, "x", 0x300)));
        Assert.Equal(StructuredReplyChunks.ErrorLength("x"), StructuredReplyChunks.ErrorLength("x", extended: false));
        Assert.Equal(20, StructuredReplyChunks.WriteHeader(new byte[20], ReplyFlags.Done, ReplyType.None, request, 0));
    }

    [Fact]
    public void Block_status_ext_is_context_count_then_64_bit_length_status_pairs()
    {
        var request = Extended(NbdCommand.BlockStatus, offset: 0, length: 0x200000000);
        var bytes = new byte[StructuredReplyChunks.BlockStatusExtendedLength(2)];
        ExtendedBlockStatusExtent[] extents = [new(4096, 0), new(0x1_0000_0000, 3)];
        Assert.Equal(bytes.Length, StructuredReplyChunks.WriteBlockStatusExtended(bytes, ReplyFlags.Done, request, 1, extents));
        Assert.Equal(
            Hex("6e8a278c" + "0001" + "0006" + Cookie + "0000000000000000" + "0000000000000028"
                + "00000001" + "00000002"
                + "0000000000001000" + "0000000000000000"
                + "0000000100000000" + "0000000000000003"),
            bytes);

        Assert.Equal(ParseStatus.Done, ExtendedReplyHeader.TryRead(bytes, out var header));
        Assert.Equal(ParseStatus.Done, StructuredReplyChunks.TryReadBlockStatusExtended(bytes.AsSpan(32), header.PayloadLength, 16, out var contextId, out var parsed));
        Assert.Equal(1u, contextId);
        Assert.Equal(extents, parsed);
    }

    [Fact]
    public void Block_status_ext_reader_checks_shape_and_limit_before_the_payload()
    {
        var payload = Hex("00000007" + "00000001" + "0000000000000200" + "0000000000000001");

        // Lengths that are not 8 + 16 n (n >= 1), or n past the limit, are refused with no payload at hand.
        foreach (var length in new ulong[] { 0, 8, 23, 25, 40 + 16 })
        {
            Assert.Equal(ParseStatus.Invalid, StructuredReplyChunks.TryReadBlockStatusExtended([], length, 2, out _, out _));
        }

        Assert.Equal(ParseStatus.Invalid, StructuredReplyChunks.TryReadBlockStatusExtendedPrefix([], ulong.MaxValue - 7, int.MaxValue, out _, out _));
        Assert.Equal(ParseStatus.NeedMoreData, StructuredReplyChunks.TryReadBlockStatusExtended(payload.AsSpan(0, 23), 24, 2, out _, out _));
        Assert.Equal(ParseStatus.Done, StructuredReplyChunks.TryReadBlockStatusExtended(payload, 24, 2, out var id, out var extents));
        Assert.Equal((7u, new ExtendedBlockStatusExtent(0x200, 1)), (id, Assert.Single(extents)));

        // A count of 0 defers to the length; any other count must match it.
        payload[7] = 0;
        Assert.Equal(ParseStatus.Done, StructuredReplyChunks.TryReadBlockStatusExtended(payload, 24, 2, out _, out _));
        payload[7] = 2;
        Assert.Equal(ParseStatus.Invalid, StructuredReplyChunks.TryReadBlockStatusExtended(payload, 24, 2, out _, out _));

        // A descriptor of zero length is refused.
        payload[7] = 1;
        payload[14] = 0;
        Assert.Equal(ParseStatus.Invalid, StructuredReplyChunks.TryReadBlockStatusExtended(payload, 24, 2, out _, out _));
        Assert.Equal(ParseStatus.NeedMoreData, StructuredReplyChunks.TryReadBlockStatusExtendedDescriptor(payload.AsSpan(8, 15), out _));
    }

    [Fact]
    public void Block_status_ext_is_written_only_for_extended_requests_and_real_extents()
    {
        var compact = new NbdRequest(CommandFlags.None, NbdCommand.BlockStatus, 1, 0, 4096);
        Assert.Throws<ArgumentException>(() => StructuredReplyChunks.WriteBlockStatusExtendedHeader(new byte[64], ReplyFlags.Done, compact, 1, 1));
        var request = Extended(NbdCommand.BlockStatus, 0, 4096);
        Assert.Throws<ArgumentException>(() => StructuredReplyChunks.WriteBlockStatusExtended(new byte[64], ReplyFlags.Done, request, 1, [new ExtendedBlockStatusExtent(0, 0)]));
        Assert.Throws<ArgumentException>(() => StructuredReplyChunks.WriteBlockStatusExtended(new byte[64], ReplyFlags.Done, request, 1, []));
    }

    [Fact]
    public void Block_status_payload_is_effect_length_then_context_ids()
    {
        var bytes = new byte[BlockStatusPayload.LengthFor(2)];
        Assert.Equal(16, BlockStatusPayload.Write(bytes, 0x1_0000_0000, [1, 3]));
        Assert.Equal(Hex("0000000100000000" + "00000001" + "00000003"), bytes);

        Assert.Equal(ParseStatus.Done, BlockStatusPayload.TryRead(bytes, 16, 4, out var payload, out var problem));
        Assert.Null(problem);
        Assert.Equal(0x1_0000_0000ul, payload!.EffectLength);
        Assert.Equal([1u, 3u], payload.ContextIds);

        // With its request: BLOCK_STATUS, PAYLOAD_LEN, and the header's length is the payload's size.
        var request = new NbdRequest(CommandFlags.PayloadLength, NbdCommand.BlockStatus, 0x0102030405060708, 0, (ulong)bytes.Length, extended: true);
        var header = new byte[32];
        request.WriteTo(header);
        Assert.Equal(Hex("21e41c71" + "0020" + "0007" + Cookie + "0000000000000000" + "0000000000000010"), header);
        Assert.Equal(16ul, request.WirePayloadLength);
    }

    [Fact]
    public void Block_status_payload_refuses_bad_lengths_too_many_ids_and_duplicates()
    {
        foreach (var length in new ulong[] { 0, 8, 11, 13, 1ul << 40 })
        {
            Assert.Equal(ParseStatus.Invalid, BlockStatusPayload.TryRead([], length, 4, out _, out var problem));
            Assert.NotNull(problem);
        }

        // Three ids when only two contexts were negotiated: refused before the bytes are even there.
        Assert.Equal(ParseStatus.Invalid, BlockStatusPayload.TryRead([], 20, 2, out _, out _));

        var bytes = Hex("0000000000001000" + "00000002" + "00000005" + "00000002");
        Assert.Equal(ParseStatus.NeedMoreData, BlockStatusPayload.TryRead(bytes.AsSpan(0, 19), 20, 4, out _, out _));
        Assert.Equal(ParseStatus.Invalid, BlockStatusPayload.TryRead(bytes, 20, 4, out var none, out var duplicate));
        Assert.Null(none);
        Assert.Contains("twice", duplicate, StringComparison.Ordinal);

        Assert.Throws<ArgumentException>(() => BlockStatusPayload.Write(new byte[8], 1, []));
    }

    private static NbdRequest Extended(NbdCommand command, ulong offset, ulong length) =>
        new(command == NbdCommand.Write ? CommandFlags.PayloadLength : CommandFlags.None, command, 0x0102030405060708, offset, length, extended: true);

    private static byte[] Chunk(Func<byte[], int> write)
    {
        var buffer = new byte[64];
        return buffer[..write(buffer)];
    }

    private static byte[] Hex(string hex) => Convert.FromHexString(hex);
}
