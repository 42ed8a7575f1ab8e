using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The payload of an ERROR or ERROR_OFFSET chunk (proto.md "Structured reply chunk types"), read both ways. Invariant:
/// no exception; a parse stays inside the payload, has an offset exactly for ERROR_OFFSET, and one a server may send
/// (nonzero error, a protocol string as message) writes back to the same payload.
/// </summary>
[Covers(typeof(StructuredReplyChunks), nameof(StructuredReplyChunks.TryReadError))]
public sealed class ErrorChunks : FuzzTarget
{
    public override void Run(byte[] input)
    {
        foreach (var type in new[] { ReplyType.Error, ReplyType.ErrorOffset })
        {
            if (!StructuredReplyChunks.TryReadError(input, type, out var error, out var message, out var offset))
            {
                continue;
            }

            int messageLength = input.Length >= 6 ? (input[4] << 8) | input[5] : -1;
            var trailer = type == ReplyType.ErrorOffset ? 8 : 0;
            Check.That(input.Length >= 6 + messageLength + trailer, $"{type}: parsed from {input.Length} bytes with a {messageLength}-byte message");
            Check.That(offset.HasValue == (type == ReplyType.ErrorOffset), $"{type}: offset {offset}");
            // Written back only what a server may send: a nonzero error ("error MUST be nonzero", which the writer
            // enforces) and a message that is a protocol string.
            if (error == NbdError.None || messageLength == 0 || !NbdString.TryDecode(input.AsSpan(6, messageLength), out var strict, out _) || strict != message)
            {
                continue;
            }

            // Written back as a whole chunk: the payload follows the 20-byte header.
            var chunk = new byte[StructuredReplyHeader.Length + 6 + messageLength + trailer];
            var written = offset is { } at
                ? StructuredReplyChunks.WriteErrorOffset(chunk, ReplyFlags.Done, 1, error, message, at)
                : StructuredReplyChunks.WriteError(chunk, ReplyFlags.Done, 1, error, message);
            Check.Same(input.AsSpan(0, 6 + messageLength + trailer), chunk.AsSpan(StructuredReplyHeader.Length, written - StructuredReplyHeader.Length), $"{type} rewritten");
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var chunk = new byte[StructuredReplyChunks.ErrorOffsetLength("bad sector")];
        var length = StructuredReplyChunks.WriteErrorOffset(chunk, ReplyFlags.Done, 1, NbdError.IO, "bad sector", 4096);
        yield return ("error-offset", chunk[StructuredReplyHeader.Length..length]);
        chunk = new byte[StructuredReplyChunks.ErrorLength("no")];
        length = StructuredReplyChunks.WriteError(chunk, ReplyFlags.Done, 1, NbdError.NotPermitted, "no");
        yield return ("error", chunk[StructuredReplyHeader.Length..length]);
    }
}
