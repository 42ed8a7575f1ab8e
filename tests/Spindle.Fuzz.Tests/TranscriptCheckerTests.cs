using Spindle.Fuzz;
using Spindle.Fuzz.Support;
using Spindle.Protocol;
using Xunit;

namespace Spindle.Fuzz.Tests;

/// <summary>
/// The server target is only as good as its transcript checker: these show it refusing servers that break the
/// protocol, and accepting a correct exchange, so a passing fuzz run means something.
/// </summary>
public sealed class TranscriptCheckerTests
{
    private static readonly byte[] Client = new WireBuilder().ClientFlags()
        .Option(NbdOption.StructuredReply).Option(NbdOption.Go, new InfoRequest("mem", []).ToBytes())
        .Request(NbdCommand.Read, 1, 0, 512).Request(NbdCommand.Flush, 2, 0, 0).ToArray();

    [Fact]
    public void A_correct_exchange_passes() =>
        ServerTranscript.Check(Client, Server(read: chunk => chunk.Chunk(ReplyType.OffsetData, 1, new WireBuilder().U64(0).Zeroes(512).ToArray())));

    [Fact]
    public void A_reply_naming_another_option_fails()
    {
        var server = Greeting().OptionReply(NbdOption.Info, OptionReplyType.Ack).ToArray();
        Assert.Contains("naming option", Assert.Throws<InvariantViolation>(() => ServerTranscript.Check(Client, server)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_reply_to_a_cookie_never_sent_fails()
    {
        var server = Server(read: chunk => chunk.Chunk(ReplyType.None, 9, []));
        Assert.Contains("which no request in flight has", Assert.Throws<InvariantViolation>(() => ServerTranscript.Check(Client, server)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_simple_reply_to_a_read_after_structured_replies_fails()
    {
        var server = Server(read: chunk => chunk.SimpleReply(1).Zeroes(512));
        Assert.Contains("simple reply to Read", Assert.Throws<InvariantViolation>(() => ServerTranscript.Check(Client, server)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_read_reply_that_does_not_cover_the_request_fails()
    {
        var server = Server(read: chunk => chunk.Chunk(ReplyType.OffsetData, 1, new WireBuilder().U64(0).Zeroes(256).ToArray()));
        Assert.Contains("covers 256", Assert.Throws<InvariantViolation>(() => ServerTranscript.Check(Client, server)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_reply_cut_short_fails()
    {
        var whole = Server(read: chunk => chunk.Chunk(ReplyType.OffsetData, 1, new WireBuilder().U64(0).Zeroes(512).ToArray()));
        Assert.Contains("cut short", Assert.Throws<InvariantViolation>(() => ServerTranscript.Check(Client, whole[..^100])).Message, StringComparison.Ordinal);
    }

    private static WireBuilder Greeting() => new WireBuilder().U64(NbdMagic.InitPassword).U64(NbdMagic.OptionMagic)
        .U16((ushort)(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes));

    private static byte[] Server(Func<WireBuilder, WireBuilder> read)
    {
        var export = new byte[InfoReplies.ExportLength];
        InfoReplies.WriteExport(export, 1 << 20, TransmissionFlags.HasFlags | TransmissionFlags.SendFlush);
        var builder = Greeting().OptionReply(NbdOption.StructuredReply, OptionReplyType.Ack)
            .OptionReply(NbdOption.Go, OptionReplyType.Info, export).OptionReply(NbdOption.Go, OptionReplyType.Ack);
        return read(builder).SimpleReply(2).ToArray();
    }
}
