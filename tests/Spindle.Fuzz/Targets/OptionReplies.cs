using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The option reply payloads a client parses: NBD_REP_INFO (its type, NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE),
/// NBD_REP_SERVER and NBD_REP_META_CONTEXT. Invariant: no exception; what parses writes back to the same bytes.
/// </summary>
[Covers(typeof(InfoReplies), nameof(InfoReplies.TryReadType))]
[Covers(typeof(InfoReplies), nameof(InfoReplies.TryReadExport))]
[Covers(typeof(InfoReplies), nameof(InfoReplies.TryReadBlockSize))]
[Covers(typeof(ServerReply), nameof(ServerReply.TryParse))]
[Covers(typeof(MetaContextReply), nameof(MetaContextReply.TryParse))]
public sealed class OptionReplies : FuzzTarget
{
    public override void Run(byte[] input)
    {
        var buffer = new byte[InfoReplies.BlockSizeLength];
        Check.That(InfoReplies.TryReadType(input, out _) == input.Length >= 2, "NBD_REP_INFO type");
        if (InfoReplies.TryReadExport(input, out var size, out var flags))
        {
            Check.Same(input, buffer.AsSpan(0, InfoReplies.WriteExport(buffer, size, flags)), "NBD_INFO_EXPORT rewritten");
        }

        if (InfoReplies.TryReadBlockSize(input, out var sizes))
        {
            Check.Same(input, buffer.AsSpan(0, InfoReplies.WriteBlockSize(buffer, sizes)), "NBD_INFO_BLOCK_SIZE rewritten");
            _ = sizes.IsValid(out _);
        }

        if (ServerReply.TryParse(input, out var name, out var description))
        {
            Strings.CheckProtocolString(name, "NBD_REP_SERVER name");
            var rest = input.Length - 4 - NbdString.ByteCount(name);
            if (rest == 0 || description.Length > 0)
            {
                Check.Same(input, ServerReply.Create(name, description), "NBD_REP_SERVER rewritten");
            }
        }

        if (MetaContextReply.TryParse(input, out var id, out var context))
        {
            Strings.CheckProtocolString(context, "NBD_REP_META_CONTEXT name");
            Check.Same(input, MetaContextReply.Create(id, context), "NBD_REP_META_CONTEXT rewritten");
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var export = new byte[InfoReplies.ExportLength];
        InfoReplies.WriteExport(export, 1 << 30, TransmissionFlags.HasFlags | TransmissionFlags.SendTrim);
        yield return ("info-export", export);
        var sizes = new byte[InfoReplies.BlockSizeLength];
        InfoReplies.WriteBlockSize(sizes, BlockSizeConstraints.Default);
        yield return ("info-block-size", sizes);
        yield return ("info-name", InfoReplies.StringInfo(InfoType.Name, "disk"));
        yield return ("server", ServerReply.Create("disk", "a memory disk"));
        yield return ("meta-context", MetaContextReply.Create(1, MetaContexts.BaseAllocation));
    }
}
