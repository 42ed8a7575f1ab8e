using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The reply headers a client reads: the simple reply (16 bytes), the structured chunk header (20 bytes) and the
/// extended chunk header (32 bytes, proto.md "Extended headers"). Invariant: no exception, the header alone parses
/// alike, and writing the parsed header back gives the same bytes.
/// </summary>
[Covers(typeof(SimpleReply), nameof(SimpleReply.TryRead))]
[Covers(typeof(StructuredReplyHeader), nameof(StructuredReplyHeader.TryRead))]
[Covers(typeof(ExtendedReplyHeader), nameof(ExtendedReplyHeader.TryRead))]
public sealed class ReplyHeaders : FuzzTarget
{
    public override void Run(byte[] input)
    {
        var buffer = new byte[ExtendedReplyHeader.Length];

        Check.PrefixStable<SimpleReply>(input, SimpleReply.Length, SimpleReply.TryRead, "simple reply");
        if (SimpleReply.TryRead(input, out var simple) == ParseStatus.Done)
        {
            Check.Same(input.AsSpan(0, SimpleReply.Length), buffer.AsSpan(0, SimpleReply.Write(buffer, simple.Error, simple.Cookie)), "simple reply rewritten");
        }

        Check.PrefixStable<StructuredReplyHeader>(input, StructuredReplyHeader.Length, StructuredReplyHeader.TryRead, "structured reply header");
        if (StructuredReplyHeader.TryRead(input, out var chunk) == ParseStatus.Done)
        {
            Check.Same(input.AsSpan(0, StructuredReplyHeader.Length),
                buffer.AsSpan(0, StructuredReplyHeader.Write(buffer, chunk.Flags, chunk.Type, chunk.Cookie, chunk.PayloadLength)), "chunk header rewritten");
            Check.That(chunk.IsDone == ((chunk.Flags & ReplyFlags.Done) != 0) && chunk.IsError == (((ushort)chunk.Type & 0x8000) != 0), "chunk header flags");
        }

        Check.PrefixStable<ExtendedReplyHeader>(input, ExtendedReplyHeader.Length, ExtendedReplyHeader.TryRead, "extended reply header");
        if (ExtendedReplyHeader.TryRead(input, out var extended) == ParseStatus.Done)
        {
            Check.Same(input.AsSpan(0, ExtendedReplyHeader.Length),
                buffer.AsSpan(0, ExtendedReplyHeader.Write(buffer, extended.Flags, extended.Type, extended.Cookie, extended.Offset, extended.PayloadLength)),
                "extended header rewritten");
            Check.That(extended.IsDone == ((extended.Flags & ReplyFlags.Done) != 0) && extended.IsError == (((ushort)extended.Type & 0x8000) != 0), "extended header flags");
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var simple = new byte[SimpleReply.Length];
        SimpleReply.Write(simple, NbdError.InvalidArgument, 7);
        yield return ("simple-einval", simple);
        var chunk = new byte[StructuredReplyHeader.Length];
        StructuredReplyHeader.Write(chunk, ReplyFlags.Done, ReplyType.OffsetData, 8, 4104);
        yield return ("chunk-offset-data", chunk);
        var extended = new byte[ExtendedReplyHeader.Length];
        ExtendedReplyHeader.Write(extended, ReplyFlags.Done, ReplyType.BlockStatusExtended, 9, 1 << 20, 24);
        yield return ("extended-block-status", extended);
    }
}
