using Spindle.Protocol;
using Spindle.Server.Negotiation;
using Spindle.Wire;

namespace Spindle.Server.Connections;

/// <summary>
/// Request payloads beyond WRITE's: with extended headers, NBD_CMD_FLAG_PAYLOAD_LEN says a payload follows the header
/// (mandatory on WRITE; on BLOCK_STATUS it names the contexts to answer). Everything a client sends is consumed, so a
/// refused request never puts the stream out of step (the reference sheet §8).
/// </summary>
internal sealed partial class NbdConnection
{
    /// <summary>
    /// Whether a request's payload is one this server takes. A payload it does not take is still read and discarded
    /// by the caller, then answered with EINVAL.
    /// </summary>
    private NbdError CheckPayload(in NbdRequest request, out string? reason)
    {
        reason = null;
        if (!request.IsExtended)
        {
            return NbdError.None;
        }

        var flagged = (request.Flags & CommandFlags.PayloadLength) != 0;
        switch (request.Command)
        {
            case NbdCommand.Write:
                // With the flag or without it (qemu's client omits it): the payload is read either way.
                return NbdError.None;
            case NbdCommand.BlockStatus when flagged:
                var contexts = _negotiator.Contexts.Count;
                if (contexts == 0)
                {
                    reason = "no metadata context was negotiated for this export";
                    return NbdError.InvalidArgument;
                }

                if (request.WirePayloadLength > (ulong)BlockStatusPayload.LengthFor(contexts))
                {
                    reason = $"a BLOCK_STATUS payload of {request.WirePayloadLength} bytes names more than the {contexts} negotiated contexts";
                    return NbdError.InvalidArgument;
                }

                return NbdError.None;
            case var _ when flagged:
                reason = $"{request.Command} carries no payload";
                return NbdError.InvalidArgument;
            default:
                return NbdError.None;
        }
    }

    /// <summary>
    /// Reads a BLOCK_STATUS payload (already bounded by <see cref="CheckPayload"/>): its effect length and the
    /// contexts to answer, each one negotiated on this connection and named once.
    /// </summary>
    private async ValueTask<(NbdError Error, string? Reason, ulong EffectLength, IReadOnlyList<SelectedContext> Contexts)> ReadStatusPayloadAsync(
        NbdRequest request, CancellationToken cancellationToken)
    {
        var selected = _negotiator.Contexts;
        var length = (int)request.WirePayloadLength;
        var buffer = BufferPool.Shared.Rent(Math.Max(length, 1));
        try
        {
            await _input.ReadExactlyAsync(buffer.AsMemory(0, length), "a BLOCK_STATUS payload", cancellationToken).ConfigureAwait(false);
            if (BlockStatusPayload.TryRead(buffer.AsSpan(0, length), (ulong)length, selected.Count, out var payload, out var problem) != ParseStatus.Done)
            {
                return (NbdError.InvalidArgument, $"bad BLOCK_STATUS payload: {problem}", 0, selected);
            }

            var chosen = new List<SelectedContext>(payload!.ContextIds.Count);
            foreach (var id in payload.ContextIds)
            {
                var context = selected.FirstOrDefault(c => c.Id == id);
                if (context is null)
                {
                    return (NbdError.InvalidArgument, $"context id {id} was not negotiated on this connection", 0, selected);
                }

                chosen.Add(context);
            }

            return (NbdError.None, null, payload.EffectLength, chosen);
        }
        finally
        {
            BufferPool.Shared.Return(buffer);
        }
    }
}
