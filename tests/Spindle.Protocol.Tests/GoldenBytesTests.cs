using Spindle.Protocol;
using Xunit;

namespace Spindle.Protocol.Tests;

/// <summary>
/// Every message layout checked against bytes written out by hand from proto.md's diagrams (all fields big-endian),
/// so a reordered field or a wrong magic cannot pass.
/// </summary>
public sealed class GoldenBytesTests
{
    [Fact]
    public void Server_greeting_is_NBDMAGIC_IHAVEOPT_then_flags()
    {
        var bytes = new byte[ServerGreeting.Length];
        ServerGreeting.Write(bytes, HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes);
        Assert.Equal(Hex("4e42444d41474943" + "49484156454f5054" + "0003"), bytes);
        Assert.Equal("NBDMAGICIHAVEOPT", System.Text.Encoding.ASCII.GetString(bytes, 0, 16));
        Assert.Equal(ParseStatus.Done, ServerGreeting.TryRead(bytes, out var flags, out var oldstyle));
        Assert.Equal(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes, flags);
        Assert.False(oldstyle);
    }

    [Fact]
    public void Oldstyle_greeting_is_recognised_and_refused()
    {
        var bytes = Hex("4e42444d41474943" + "0000420281861253" + "0000000000100000");
        Assert.Equal(ParseStatus.Invalid, ServerGreeting.TryRead(bytes, out _, out var oldstyle));
        Assert.True(oldstyle);
    }

    [Fact]
    public void Option_header_is_IHAVEOPT_option_length()
    {
        var bytes = new byte[OptionHeader.Length];
        OptionHeader.Write(bytes, NbdOption.Go, 0x0102);
        Assert.Equal(Hex("49484156454f5054" + "00000007" + "00000102"), bytes);
        Assert.Equal(ParseStatus.Done, OptionHeader.TryRead(bytes, out var header));
        Assert.Equal(new OptionHeader(NbdOption.Go, 0x0102), header);
        Assert.Equal(ParseStatus.NeedMoreData, OptionHeader.TryRead(bytes.AsSpan(0, 15), out _));
        bytes[0] ^= 0xff;
        Assert.Equal(ParseStatus.Invalid, OptionHeader.TryRead(bytes, out _));
    }

    [Fact]
    public void Option_reply_uses_the_reply_magic_not_IHAVEOPT()
    {
        var bytes = new byte[OptionReplyHeader.Length];
        OptionReplyHeader.Write(bytes, NbdOption.List, OptionReplyType.ErrorUnsupported, 5);
        Assert.Equal(Hex("0003e889045565a9" + "00000003" + "80000001" + "00000005"), bytes);
        Assert.Equal(ParseStatus.Done, OptionReplyHeader.TryRead(bytes, out var reply));
        Assert.True(reply.IsError);
    }

    [Theory]
    [InlineData(OptionReplyType.Ack, 1u)]
    [InlineData(OptionReplyType.Server, 2u)]
    [InlineData(OptionReplyType.Info, 3u)]
    [InlineData(OptionReplyType.MetaContext, 4u)]
    [InlineData(OptionReplyType.ErrorUnsupported, 0x80000001u)]
    [InlineData(OptionReplyType.ErrorPolicy, 0x80000002u)]
    [InlineData(OptionReplyType.ErrorInvalid, 0x80000003u)]
    [InlineData(OptionReplyType.ErrorPlatform, 0x80000004u)]
    [InlineData(OptionReplyType.ErrorTlsRequired, 0x80000005u)]
    [InlineData(OptionReplyType.ErrorUnknown, 0x80000006u)]
    [InlineData(OptionReplyType.ErrorShutdown, 0x80000007u)]
    [InlineData(OptionReplyType.ErrorBlockSizeRequired, 0x80000008u)]
    [InlineData(OptionReplyType.ErrorTooBig, 0x80000009u)]
    public void Option_reply_types_have_the_spec_values(OptionReplyType type, uint value) => Assert.Equal(value, (uint)type);

    [Fact]
    public void Constants_match_the_spec()
    {
        Assert.Equal(0x25609513u, NbdMagic.RequestMagic);
        Assert.Equal(0x67446698u, NbdMagic.SimpleReplyMagic);
        Assert.Equal(0x668e33efu, NbdMagic.StructuredReplyMagic);
        Assert.Equal(new uint[] { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 }, Enum.GetValues<NbdOption>().Select(o => (uint)o));
        Assert.Equal(new ushort[] { 0, 1, 2, 3, 4, 5, 6, 7, 8 }, Enum.GetValues<NbdCommand>().Select(c => (ushort)c));
        Assert.Equal(new uint[] { 0, 1, 5, 12, 22, 28, 75, 95, 108 }, Enum.GetValues<NbdError>().Select(e => (uint)e));
        Assert.Equal(0x0001, (int)TransmissionFlags.HasFlags);
        Assert.Equal(0x0080, (int)TransmissionFlags.SendDf);
        Assert.Equal(0x0100, (int)TransmissionFlags.CanMultiConn);
        Assert.Equal(0x0400, (int)TransmissionFlags.SendCache);
        Assert.Equal(0x0800, (int)TransmissionFlags.SendFastZero);
        Assert.Equal(0x10, (int)CommandFlags.FastZero);
        Assert.Equal(0x8001, (int)ReplyType.Error);
        Assert.Equal(0x8002, (int)ReplyType.ErrorOffset);
        Assert.Equal(5, (int)ReplyType.BlockStatus);
    }

    [Fact]
    public void Request_header_is_28_bytes_in_spec_order()
    {
        var request = new NbdRequest(CommandFlags.Fua, NbdCommand.Write, 0x0102030405060708, 0x1122334455667788, 0x00010000);
        var bytes = new byte[28];
        Assert.Equal(28, request.WriteTo(bytes));
        Assert.Equal(Hex("25609513" + "0001" + "0001" + "0102030405060708" + "1122334455667788" + "00010000"), bytes);
        Assert.Equal(ParseStatus.Done, NbdRequest.TryRead(bytes, out var parsed));
        Assert.Equal(request, parsed);
        Assert.Equal(65536, parsed.PayloadLength);
    }

    [Fact]
    public void Request_with_wrong_magic_is_invalid_and_short_request_needs_more()
    {
        var bytes = Hex("25609514" + "0000" + "0000" + "0000000000000001" + "0000000000000000" + "00000200");
        Assert.Equal(ParseStatus.Invalid, NbdRequest.TryRead(bytes, out _));
        Assert.Equal(ParseStatus.NeedMoreData, NbdRequest.TryRead(bytes.AsSpan(0, 27), out _));
    }

    [Fact]
    public void Only_write_carries_a_payload()
    {
        foreach (var command in Enum.GetValues<NbdCommand>())
        {
            var request = new NbdRequest(CommandFlags.None, command, 1, 0, 4096);
            Assert.Equal(command == NbdCommand.Write ? 4096 : 0, request.PayloadLength);
        }
    }

    [Fact]
    public void Simple_reply_is_magic_error_cookie()
    {
        var bytes = new byte[16];
        SimpleReply.Write(bytes, NbdError.NoSpace, 0xdeadbeefcafef00d);
        Assert.Equal(Hex("67446698" + "0000001c" + "deadbeefcafef00d"), bytes);
        Assert.Equal(ParseStatus.Done, SimpleReply.TryRead(bytes, out var reply));
        Assert.Equal(new SimpleReply(NbdError.NoSpace, 0xdeadbeefcafef00d), reply);
    }

    [Fact]
    public void Structured_none_chunk_has_done_and_no_payload()
    {
        var bytes = new byte[20];
        StructuredReplyChunks.WriteNone(bytes, 7);
        Assert.Equal(Hex("668e33ef" + "0001" + "0000" + "0000000000000007" + "00000000"), bytes);
    }

    [Fact]
    public void Offset_data_prefix_counts_the_offset_in_the_length()
    {
        var bytes = new byte[28];
        StructuredReplyChunks.WriteOffsetDataPrefix(bytes, ReplyFlags.None, 9, 0x200, 512);
        Assert.Equal(Hex("668e33ef" + "0000" + "0001" + "0000000000000009" + "00000208" + "0000000000000200"), bytes);
    }

    [Fact]
    public void Offset_hole_is_offset_and_32_bit_size()
    {
        var bytes = new byte[32];
        StructuredReplyChunks.WriteOffsetHole(bytes, ReplyFlags.Done, 1, 4096, 65536);
        Assert.Equal(Hex("668e33ef" + "0001" + "0002" + "0000000000000001" + "0000000c" + "0000000000001000" + "00010000"), bytes);
        Assert.Throws<ArgumentOutOfRangeException>(() => StructuredReplyChunks.WriteOffsetHole(new byte[32], ReplyFlags.Done, 1, 0, 0));
    }

    [Fact]
    public void Error_chunk_is_error_message_length_message()
    {
        var bytes = new byte[StructuredReplyChunks.ErrorLength("bad")];
        StructuredReplyChunks.WriteError(bytes, ReplyFlags.Done, 2, NbdError.InvalidArgument, "bad");
        Assert.Equal(Hex("668e33ef" + "0001" + "8001" + "0000000000000002" + "00000009" + "00000016" + "0003" + "626164"), bytes);
        Assert.True(StructuredReplyChunks.TryReadError(bytes.AsSpan(20), ReplyType.Error, out var error, out var message, out var offset));
        Assert.Equal((NbdError.InvalidArgument, "bad", (ulong?)null), (error, message, offset));
    }

    [Fact]
    public void Error_offset_chunk_ends_with_the_offset()
    {
        var bytes = new byte[StructuredReplyChunks.ErrorOffsetLength("io")];
        StructuredReplyChunks.WriteErrorOffset(bytes, ReplyFlags.Done, 3, NbdError.IO, "io", 0x1000);
        Assert.Equal(Hex("668e33ef" + "0001" + "8002" + "0000000000000003" + "00000010" + "00000005" + "0002" + "696f" + "0000000000001000"), bytes);
        Assert.True(StructuredReplyChunks.TryReadError(bytes.AsSpan(20), ReplyType.ErrorOffset, out _, out _, out var offset));
        Assert.Equal(0x1000ul, offset);
    }

    [Fact]
    public void Error_message_is_cut_at_4096_bytes_on_a_character_boundary()
    {
        var message = new string('é', 3000); // 6000 bytes of UTF-8
        var bytes = new byte[StructuredReplyChunks.ErrorLength(message)];
        var written = StructuredReplyChunks.WriteError(bytes, ReplyFlags.Done, 1, NbdError.IO, message);
        Assert.True(StructuredReplyChunks.TryReadError(bytes.AsSpan(20, written - 20), ReplyType.Error, out _, out var decoded, out _));
        Assert.Equal(2048, decoded.Length);
        Assert.DoesNotContain('\uFFFD', decoded);
    }

    [Fact]
    public void Block_status_chunk_is_context_id_then_length_status_pairs()
    {
        var bytes = new byte[StructuredReplyChunks.BlockStatusLength(2)];
        StructuredReplyChunks.WriteBlockStatus(bytes, ReplyFlags.Done, 4, 1, [new BlockStatusExtent(4096, 0), new BlockStatusExtent(8192, 3)]);
        Assert.Equal(Hex("668e33ef" + "0001" + "0005" + "0000000000000004" + "00000014" + "00000001" + "00001000" + "00000000" + "00002000" + "00000003"), bytes);
        Assert.Throws<ArgumentException>(() => StructuredReplyChunks.WriteBlockStatus(new byte[64], ReplyFlags.Done, 4, 1, [new BlockStatusExtent(0, 0)]));
    }

    [Fact]
    public void Export_name_reply_has_124_zeroes_unless_no_zeroes()
    {
        var full = new byte[ExportNameReply.FullLength];
        Array.Fill(full, (byte)0xee);
        Assert.Equal(134, ExportNameReply.Write(full, 0x40000000, TransmissionFlags.HasFlags | TransmissionFlags.SendFlush, noZeroes: false));
        Assert.Equal(Hex("0000000040000000" + "0005"), full[..10]);
        Assert.All(full[10..], b => Assert.Equal(0, b));
        Assert.Equal(10, ExportNameReply.Write(new byte[134], 1, TransmissionFlags.HasFlags, noZeroes: true));
    }

    [Fact]
    public void Info_export_is_exactly_12_bytes_and_block_size_14()
    {
        var export = new byte[12];
        InfoReplies.WriteExport(export, 0x100000, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly);
        Assert.Equal(Hex("0000" + "0000000000100000" + "0003"), export);
        var sizes = new byte[14];
        InfoReplies.WriteBlockSize(sizes, new BlockSizeConstraints(1, 4096, 33554432));
        Assert.Equal(Hex("0003" + "00000001" + "00001000" + "02000000"), sizes);
        Assert.True(InfoReplies.TryReadBlockSize(sizes, out var parsed));
        Assert.Equal(new BlockSizeConstraints(1, 4096, 33554432), parsed);
        Assert.False(InfoReplies.TryReadExport(export.AsSpan(0, 11), out _, out _));
    }

    [Fact]
    public void Info_name_prepends_the_type_to_the_name()
    {
        // A C# server once overwrote the first two bytes of the name with the type (sheet §10 rule 21).
        Assert.Equal(Hex("0001" + "6469736b"), InfoReplies.StringInfo(InfoType.Name, "disk"));
    }

    [Fact]
    public void Server_reply_is_name_length_name_then_details()
    {
        Assert.Equal(Hex("00000004" + "6469736b" + "6d79"), ServerReply.Create("disk", "my"));
        Assert.True(ServerReply.TryParse(Hex("00000004" + "6469736b" + "6d79"), out var name, out var details));
        Assert.Equal(("disk", "my"), (name, details));
        Assert.False(ServerReply.TryParse(Hex("00000009" + "6469736b"), out _, out _));
    }

    [Fact]
    public void Info_request_round_trips_and_rejects_lying_lengths()
    {
        var bytes = new InfoRequest("ab", [InfoType.Name, InfoType.BlockSize]).ToBytes();
        Assert.Equal(Hex("00000002" + "6162" + "0002" + "0001" + "0003"), bytes);
        Assert.True(InfoRequest.TryParse(bytes, out var parsed, out _));
        Assert.Equal("ab", parsed!.ExportName);
        Assert.Equal([InfoType.Name, InfoType.BlockSize], parsed.Requests);

        // Name length greater than option length - 6 (sheet §10 rule 18).
        Assert.False(InfoRequest.TryParse(Hex("00000003" + "6162" + "0000"), out _, out var problem));
        Assert.Contains("overruns", problem, StringComparison.Ordinal);

        // Count of info requests that does not match the bytes.
        Assert.False(InfoRequest.TryParse(Hex("00000000" + "0002" + "0001"), out _, out _));
        Assert.False(InfoRequest.TryParse(Hex("0000"), out _, out _));
    }

    [Fact]
    public void Meta_context_request_round_trips_and_rejects_overruns()
    {
        var bytes = new MetaContextRequest("e", ["base:allocation"]).ToBytes();
        Assert.Equal(Hex("00000001" + "65" + "00000001" + "0000000f" + Convert.ToHexString("base:allocation"u8)), bytes);
        Assert.True(MetaContextRequest.TryParse(bytes, out var parsed, out _));
        Assert.Equal(["base:allocation"], parsed!.Queries);

        Assert.False(MetaContextRequest.TryParse(bytes.AsSpan(0, bytes.Length - 1), out _, out _));
        Assert.False(MetaContextRequest.TryParse(Hex("00000000" + "ffffffff"), out _, out var problem));
        Assert.Contains("claims", problem, StringComparison.Ordinal);
        Assert.False(MetaContextRequest.TryParse([.. bytes, 0], out _, out _));
    }

    [Fact]
    public void Meta_context_reply_is_id_then_name()
    {
        Assert.Equal(Hex("00000001" + Convert.ToHexString("base:allocation"u8)), MetaContextReply.Create(1, "base:allocation"));
    }

    [Theory]
    [InlineData(new byte[] { 0x61, 0x00, 0x62 }, "NUL")]
    [InlineData(new byte[] { 0xc3, 0x28 }, "UTF-8")]
    public void Strings_refuse_nul_and_invalid_utf8(byte[] bytes, string expected)
    {
        Assert.False(NbdString.TryDecode(bytes, out _, out var problem));
        Assert.Contains(expected, problem, StringComparison.Ordinal);
        Assert.False(NbdString.TryDecode(new byte[4097], out _, out _));
        Assert.True(NbdString.TryDecode("ünïcode"u8, out var value, out _));
        Assert.Equal("ünïcode", value);
    }

    [Theory]
    [InlineData(1u, 4096u, 33554432u, true)]
    [InlineData(512u, 4096u, 0xffffffffu, true)]
    [InlineData(3u, 4096u, 33554432u, false)]
    [InlineData(131072u, 131072u, 33554432u, false)]
    [InlineData(4096u, 512u, 33554432u, false)]
    [InlineData(512u, 4096u, 2048u, false)]
    public void Block_size_rules(uint minimum, uint preferred, uint maximum, bool valid) =>
        Assert.Equal(valid, new BlockSizeConstraints(minimum, preferred, maximum).IsValid(out _));

    private static byte[] Hex(string hex) => Convert.FromHexString(hex);
}
