using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The option data a server parses: INFO/GO (<see cref="InfoRequest"/>) and LIST/SET_META_CONTEXT
/// (<see cref="MetaContextRequest"/>). Invariant: no exception; a refusal says why; what parses is made of protocol
/// strings and writes back to exactly the bytes it came from (so nothing was skipped or invented).
/// </summary>
[Covers(typeof(InfoRequest), nameof(InfoRequest.TryParse))]
[Covers(typeof(MetaContextRequest), nameof(MetaContextRequest.TryParse))]
public sealed class OptionRequests : FuzzTarget
{
    public override void Run(byte[] input)
    {
        if (InfoRequest.TryParse(input, out var info, out var problem))
        {
            Check.That(info is not null && problem is null, "INFO/GO parsed without a request, or with a problem");
            Check.Same(input, info!.ToBytes(), "INFO/GO rewritten");
            Strings.CheckProtocolString(info.ExportName, "INFO/GO export name");
        }
        else
        {
            Check.That(info is null && !string.IsNullOrEmpty(problem), "INFO/GO refused without saying why");
        }

        if (MetaContextRequest.TryParse(input, out var meta, out problem))
        {
            Check.That(meta is not null && problem is null, "meta context option parsed without a request, or with a problem");
            Check.Same(input, meta!.ToBytes(), "meta context option rewritten");
            Strings.CheckProtocolString(meta.ExportName, "meta context export name");
            foreach (var query in meta.Queries)
            {
                Strings.CheckProtocolString(query, "meta context query");
            }
        }
        else
        {
            Check.That(meta is null && !string.IsNullOrEmpty(problem), "meta context option refused without saying why");
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        yield return ("go-named", new InfoRequest("disk", [InfoType.Name, InfoType.BlockSize]).ToBytes());
        yield return ("go-default", new InfoRequest(string.Empty, []).ToBytes());
        yield return ("set-meta", new MetaContextRequest("disk", [MetaContexts.BaseAllocation, "qemu:dirty-bitmap:b0"]).ToBytes());
        yield return ("list-meta-empty", new MetaContextRequest(string.Empty, []).ToBytes());
    }
}
