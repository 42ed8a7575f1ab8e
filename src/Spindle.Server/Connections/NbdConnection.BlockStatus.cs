using Spindle.Protocol;
using Spindle.Server.Negotiation;
using Spindle.Storage;

namespace Spindle.Server.Connections;

/// <summary>
/// NBD_CMD_BLOCK_STATUS: one status list per selected metadata context, filled by the device (base:allocation from
/// <see cref="BlockDevice.GetExtentsAsync"/>, the others from their <see cref="MetaContextSource"/>), answered with one
/// chunk per context.
/// </summary>
internal sealed partial class NbdConnection
{
    private ValueTask CollectStatusAsync(TransmissionRequest work, BlockDevice device, CancellationToken cancellationToken)
    {
        var request = work.Header;
        var contexts = work.Contexts;
        var capacity = (request.Flags & CommandFlags.RequestOne) != 0 ? 1 : _options.MaxExtentsPerReply;
        var lists = work.StatusLists(contexts.Count, Math.Min(_options.MaxExtentsPerReply, 64));
        for (var i = 0; i < contexts.Count; i++)
        {
            lists[i].Clear(capacity);
            var pending = Collect(contexts[i], lists[i], device, (long)request.Offset, (long)work.EffectLength, cancellationToken);
            if (!pending.IsCompletedSuccessfully)
            {
                return CollectRestAsync(pending, i, work, device, cancellationToken);
            }
        }

        return ValueTask.CompletedTask;
    }

    private async ValueTask CollectRestAsync(ValueTask pending, int index, TransmissionRequest work, BlockDevice device, CancellationToken cancellationToken)
    {
        await pending.ConfigureAwait(false);
        var request = work.Header;
        var contexts = work.Contexts;
        var lists = work.StatusLists(contexts.Count, 0);
        for (var i = index + 1; i < contexts.Count; i++)
        {
            lists[i].Clear(lists[index].MaxCount);
            await Collect(contexts[i], lists[i], device, (long)request.Offset, (long)work.EffectLength, cancellationToken).ConfigureAwait(false);
        }
    }

    private static ValueTask Collect(SelectedContext context, ExtentList list, BlockDevice device, long offset, long length, CancellationToken cancellationToken)
    {
        if (context.Source is { } source)
        {
            return source.GetStatusAsync(offset, length, list, cancellationToken);
        }

        if ((device.Features & BlockDeviceFeatures.Extents) == 0)
        {
            // Status 0 ("allocated or unknown") is always a correct answer.
            list.Add(length, AllocationFlags.Data);
            return ValueTask.CompletedTask;
        }

        return device.GetExtentsAsync(offset, length, list, cancellationToken);
    }

    /// <summary>Every context must describe at least the first byte of the request.</summary>
    private BlockDeviceException? CheckStatus(TransmissionRequest work)
    {
        var contexts = work.Contexts;
        var lists = work.StatusLists(contexts.Count, 0);
        for (var i = 0; i < contexts.Count; i++)
        {
            if (lists[i].Count == 0)
            {
                return new BlockDeviceException(NbdError.IO, contexts[i].Source is null ? "the backend reported no extents" : $"{contexts[i].Name} reported no extents");
            }
        }

        return null;
    }
}
