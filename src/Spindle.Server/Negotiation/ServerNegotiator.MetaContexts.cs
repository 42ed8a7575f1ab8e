using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;

namespace Spindle.Server.Negotiation;

/// <summary>A metadata context selected for transmission: its id on this connection and what answers it.</summary>
/// <param name="Id">The id sent in NBD_REP_META_CONTEXT and in BLOCK_STATUS chunks.</param>
/// <param name="Name">The full context name.</param>
/// <param name="Source">The device's source, or null for <c>base:allocation</c> (the device's extents).</param>
internal sealed record SelectedContext(uint Id, string Name, MetaContextSource? Source);

/// <summary>
/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT (proto.md "Metadata querying"): <c>base:allocation</c> on
/// every export, the device's own contexts (<see cref="BlockDevice.MetaContexts"/>, such as qemu:dirty-bitmap:NAME),
/// and the descriptive <c>x-spindle:</c> identity contexts (listed only, never selected).
/// </summary>
internal sealed partial class ServerNegotiator
{
    /// <summary>The id of <c>base:allocation</c> on every connection. Opaque to clients, valid only on this connection.</summary>
    internal const uint AllocationContextId = 1;

    private readonly List<SelectedContext> _selected = [];
    private string? _contextExport;

    /// <summary>The contexts BLOCK_STATUS reports, in id order; empty when none was selected for the export.</summary>
    public IReadOnlyList<SelectedContext> Contexts => _selected;

    private void HandleMetaContext(NbdOption option, ReadOnlySpan<byte> data)
    {
        var set = option == NbdOption.SetMetaContext;
        if (set)
        {
            // SET replaces every earlier selection, even when it fails.
            _selected.Clear();
            _contextExport = null;
        }

        if (!StructuredReplies)
        {
            WriteError(option, OptionReplyType.ErrorInvalid, "metadata contexts need structured replies to be negotiated first");
            return;
        }

        if (!MetaContextRequest.TryParse(data, out var request, out var problem))
        {
            WriteError(option, OptionReplyType.ErrorInvalid, problem!);
            return;
        }

        // ERR_TLS_REQD is only allowed for INFO and GO: a hidden export is simply unknown here.
        var (export, refusal, reason) = Resolve(request!.ExportName);
        if (export is null)
        {
            WriteError(option, refusal == OptionReplyType.ErrorTlsRequired ? OptionReplyType.ErrorUnknown : refusal, reason);
            return;
        }

        ReleaseIfDynamic(export);

        var available = AvailableContexts(export);
        var matched = new bool[available.Count];
        var identity = false;
        foreach (var query in request.Queries)
        {
            identity |= !set && query == StableNames.MetaNamespace;
            var colon = query.IndexOf(':', StringComparison.Ordinal);
            if (colon <= 0)
            {
                WriteError(option, OptionReplyType.ErrorInvalid, $"query '{query}' does not start with a namespace and a colon");
                return;
            }

            for (var i = 0; i < available.Count; i++)
            {
                matched[i] |= Matches(available[i].Name, query, set);
            }
        }

        if (!set && request.Queries.Count == 0)
        {
            // LIST with no query: every context the export can give.
            Array.Fill(matched, true);
        }

        if (identity)
        {
            // The export's stable names, for clients that make /dev/disk/by-*-style links (see ExportIdentity).
            WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(0, StableNames.MetaContext(StableNames.UuidKey, export.Uuid.ToString("D"))));
            if (export.Options.Label is { } label)
            {
                WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(0, StableNames.MetaContext(StableNames.LabelKey, label)));
            }

            if (export.Options.Serial is { } serial)
            {
                WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(0, StableNames.MetaContext(StableNames.SerialKey, serial)));
            }
        }

        for (var i = 0; i < available.Count; i++)
        {
            if (!matched[i])
            {
                continue;
            }

            var context = available[i];
            WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(set ? context.Id : 0u, context.Name));
            if (set)
            {
                _selected.Add(context);
                _contextExport = request.ExportName;
            }
        }

        WriteReply(option, OptionReplyType.Ack, default);
    }

    /// <summary>
    /// Points the selected contexts at <paramref name="export"/>'s own sources. An image of a directory export is
    /// opened for SET_META_CONTEXT and given back at once, so GO may get another instance of it (the first one closed
    /// in between): the contexts keep their ids and names, and answer from the device actually served. A context the
    /// new instance no longer has (its bitmap vanished in between) is dropped, as if never selected.
    /// </summary>
    private void RebindContexts(Export export)
    {
        var sources = export.Device.MetaContexts;
        for (var i = _selected.Count - 1; i >= 0; i--)
        {
            var context = _selected[i];
            if (context.Source is null || sources.Contains(context.Source))
            {
                continue;
            }

            var replacement = sources.FirstOrDefault(source => source.Name == context.Name);
            if (replacement is null)
            {
                _selected.RemoveAt(i);
            }
            else
            {
                _selected[i] = context with { Source = replacement };
            }
        }
    }

    /// <summary>Every context the export answers, with the id it gets when selected.</summary>
    private static List<SelectedContext> AvailableContexts(Export export)
    {
        var sources = export.Device.MetaContexts;
        var contexts = new List<SelectedContext>(1 + sources.Count) { new(AllocationContextId, MetaContexts.BaseAllocation, null) };
        for (var i = 0; i < sources.Count; i++)
        {
            contexts.Add(new SelectedContext(AllocationContextId + 1 + (uint)i, sources[i].Name, sources[i]));
        }

        return contexts;
    }

    /// <summary>
    /// Whether a query names a context. SET selects exact names only; LIST also takes a query that ends in a colon as
    /// every context below it ("base:", "qemu:", "qemu:dirty-bitmap:"), as qemu-nbd does. Unknown names and namespaces
    /// match nothing and are not an error (proto.md).
    /// </summary>
    private static bool Matches(string context, string query, bool set) =>
        context == query || (!set && query.EndsWith(':') && context.StartsWith(query, StringComparison.Ordinal));
}
