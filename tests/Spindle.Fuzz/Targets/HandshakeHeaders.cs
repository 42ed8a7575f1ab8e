using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The fixed-size handshake parts (proto.md "Handshake"): the server greeting, the client's option header, the server's
/// option reply header and the EXPORT_NAME reply. Invariant: no exception; a parse reads exactly its header (a shorter
/// prefix never parses, bytes after it change nothing) and writing the parsed value back gives the same bytes.
/// </summary>
[Covers(typeof(ServerGreeting), nameof(ServerGreeting.TryRead))]
[Covers(typeof(OptionHeader), nameof(OptionHeader.TryRead))]
[Covers(typeof(OptionReplyHeader), nameof(OptionReplyHeader.TryRead))]
[Covers(typeof(ExportNameReply), nameof(ExportNameReply.TryRead))]
public sealed class HandshakeHeaders : FuzzTarget
{
    public override void Run(byte[] input)
    {
        var buffer = new byte[ExportNameReply.FullLength];

        Check.PrefixStable<(HandshakeFlags, bool)>(input, ServerGreeting.Length, ReadGreeting, "greeting");
        if (ReadGreeting(input, out var greeting) == ParseStatus.Done)
        {
            Check.That(!greeting.Oldstyle, "a greeting parsed as oldstyle");
            Check.Same(input.AsSpan(0, ServerGreeting.Length), buffer.AsSpan(0, ServerGreeting.Write(buffer, greeting.Flags)), "greeting rewritten");
        }

        Check.PrefixStable<OptionHeader>(input, OptionHeader.Length, OptionHeader.TryRead, "option header");
        if (OptionHeader.TryRead(input, out var option) == ParseStatus.Done)
        {
            Check.Same(input.AsSpan(0, OptionHeader.Length), buffer.AsSpan(0, OptionHeader.Write(buffer, option.Option, option.DataLength)), "option header rewritten");
        }

        Check.PrefixStable<OptionReplyHeader>(input, OptionReplyHeader.Length, OptionReplyHeader.TryRead, "option reply header");
        if (OptionReplyHeader.TryRead(input, out var reply) == ParseStatus.Done)
        {
            Check.Same(input.AsSpan(0, OptionReplyHeader.Length),
                buffer.AsSpan(0, OptionReplyHeader.Write(buffer, reply.Option, reply.Type, reply.DataLength)), "option reply header rewritten");
            Check.That(reply.IsError == (((uint)reply.Type & 0x8000_0000) != 0), "option reply error bit");
        }

        if (ExportNameReply.TryRead(input, out var size, out var flags))
        {
            Check.That(input.Length >= ExportNameReply.ShortLength, "EXPORT_NAME reply parsed from too few bytes");
            Check.Same(input.AsSpan(0, ExportNameReply.ShortLength),
                buffer.AsSpan(0, ExportNameReply.Write(buffer, size, flags, noZeroes: true)), "EXPORT_NAME reply rewritten");
        }
        else
        {
            Check.That(input.Length < ExportNameReply.ShortLength, $"EXPORT_NAME reply of {input.Length} bytes refused");
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var greeting = new byte[ServerGreeting.Length];
        ServerGreeting.Write(greeting, HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes);
        yield return ("greeting", greeting);
        var option = new byte[OptionHeader.Length];
        OptionHeader.Write(option, NbdOption.Go, 12);
        yield return ("option-go", option);
        var reply = new byte[OptionReplyHeader.Length];
        OptionReplyHeader.Write(reply, NbdOption.Go, OptionReplyType.ErrorUnknown, 0);
        yield return ("option-reply-error", reply);
        var export = new byte[ExportNameReply.FullLength];
        ExportNameReply.Write(export, 1 << 20, TransmissionFlags.HasFlags | TransmissionFlags.SendFlush, noZeroes: false);
        yield return ("export-name-reply", export);
    }

    private static ParseStatus ReadGreeting(ReadOnlySpan<byte> source, out (HandshakeFlags Flags, bool Oldstyle) greeting)
    {
        var status = ServerGreeting.TryRead(source, out var flags, out var oldstyle);
        greeting = (flags, oldstyle);
        return status;
    }
}
