using System.Diagnostics.CodeAnalysis;
using Spindle.Client.Connection;
using Spindle.Protocol;

namespace Spindle.Client;

public sealed partial class NbdClient
{
    /// <summary>
    /// The longest TRIM / WRITE_ZEROES / CACHE / BLOCK_STATUS in one request: 32 bits aligned to the minimum block, or
    /// with extended headers the whole export (64-bit lengths).
    /// </summary>
    private long MaxEffectLength => Export.ExtendedHeaders ? Math.Max(Export.Size, 1) : uint.MaxValue - (uint.MaxValue % Export.MinimumBlockSize);

    /// <summary>
    /// Checks a request against the export before it is sent (proto.md "Request message" and "Block size
    /// constraints"): the client MUST NOT send what the server did not advertise, nor ranges past the end.
    /// </summary>
    private bool TryValidate(NbdCommand command, long offset, long length, CommandFlags flags, [NotNullWhen(false)] out Exception? problem)
    {
        problem = Validate(command, offset, length, flags);
        return problem is null;
    }

    private Exception? Validate(NbdCommand command, long offset, long length, CommandFlags flags)
    {
        if (Volatile.Read(ref _disposed) != 0)
        {
            return new ObjectDisposedException(nameof(NbdClient), $"the client for {Uri} has been closed");
        }

        var export = Export;
        var name = NbdServerErrorException.CommandName(command);
        if (command != NbdCommand.Read && command != NbdCommand.BlockStatus && command != NbdCommand.Cache && export.IsReadOnly)
        {
            return new NotSupportedException($"{name} refused: export '{export.Name}' is read-only");
        }

        var missing = command switch
        {
            NbdCommand.Flush when !export.CanFlush => "NBD_FLAG_SEND_FLUSH",
            NbdCommand.Trim when !export.CanTrim => "NBD_FLAG_SEND_TRIM",
            NbdCommand.WriteZeroes when !export.CanWriteZeroes => "NBD_FLAG_SEND_WRITE_ZEROES",
            NbdCommand.Cache when !export.CanCache => "NBD_FLAG_SEND_CACHE",
            _ => null,
        };
        if (missing is not null)
        {
            return new NotSupportedException($"{name} refused: export '{export.Name}' does not support it (the server did not set {missing})");
        }

        var allowed = command switch
        {
            NbdCommand.Read => CommandFlags.DontFragment,
            NbdCommand.Write or NbdCommand.Trim => CommandFlags.Fua,
            NbdCommand.WriteZeroes => CommandFlags.Fua | CommandFlags.NoHole | CommandFlags.FastZero,
            NbdCommand.BlockStatus => CommandFlags.RequestOne,
            _ => CommandFlags.None,
        };
        if ((flags & ~allowed) != 0)
        {
            return new ArgumentException($"{name} does not take flags {flags & ~allowed}", nameof(flags));
        }

        var unadvertised = flags switch
        {
            _ when (flags & CommandFlags.Fua) != 0 && !export.CanFua => "FUA (the server did not set NBD_FLAG_SEND_FUA)",
            _ when (flags & CommandFlags.FastZero) != 0 && !export.CanFastZero => "FAST_ZERO (the server did not set NBD_FLAG_SEND_FAST_ZERO)",
            _ when (flags & CommandFlags.DontFragment) != 0 && !export.CanDontFragment => "DF (the server did not set NBD_FLAG_SEND_DF)",
            _ => null,
        };
        if (unadvertised is not null)
        {
            return new NotSupportedException($"{name} refused: export '{export.Name}' does not support {unadvertised}");
        }

        if (command == NbdCommand.Flush)
        {
            return null;
        }

        if (offset < 0 || length < 0)
        {
            return new ArgumentOutOfRangeException(offset < 0 ? nameof(offset) : nameof(length), $"{name} offset {offset} length {length}: negative");
        }

        if (command == NbdCommand.BlockStatus && length == 0)
        {
            return new ArgumentOutOfRangeException(nameof(length), "BLOCK_STATUS needs a length of at least one byte");
        }

        if (offset > export.Size || length > export.Size - offset)
        {
            return new ArgumentOutOfRangeException(nameof(length),
                $"{name} offset {offset} length {length} reaches past the end of export '{export.Name}' ({export.Size} bytes)");
        }

        var minimum = export.MinimumBlockSize;
        if (minimum > 1)
        {
            // The tail of an export whose size is not a multiple of the minimum block can only be reached unaligned.
            var endsAtSize = offset + length == export.Size;
            if (offset % minimum != 0 || (length % minimum != 0 && !endsAtSize))
            {
                return new ArgumentException(
                    $"{name} offset {offset} length {length} is not aligned to the export's minimum block size of {minimum} bytes", nameof(offset));
            }
        }

        if ((command == NbdCommand.Read || command == NbdCommand.Write) && length > export.MaximumPayload)
        {
            return new ArgumentOutOfRangeException(nameof(length),
                $"{name} of {length} bytes is larger than the export's maximum payload of {export.MaximumPayload} bytes: split it");
        }

        return null;
    }

    private ValueTask EffectAsync(NbdCommand command, long offset, long length, CommandFlags flags, CancellationToken cancellationToken)
    {
        if (!TryValidate(command, offset, length, flags, out var invalid))
        {
            return ValueTask.FromException(invalid);
        }

        if (length == 0)
        {
            return ValueTask.CompletedTask;
        }

        if (length <= MaxEffectLength)
        {
            return SubmitAsync(NbdOperation.Effect(command, offset, length, flags), cancellationToken);
        }

        return SplitEffectAsync(command, offset, length, flags, cancellationToken);
    }

    /// <summary>A TRIM / WRITE_ZEROES / CACHE longer than the 32-bit length field, sent as several requests at once.</summary>
    private async ValueTask SplitEffectAsync(NbdCommand command, long offset, long length, CommandFlags flags, CancellationToken cancellationToken)
    {
        var parts = new List<Task>();
        var end = offset + length;
        for (var position = offset; position < end; position += MaxEffectLength)
        {
            var count = Math.Min(MaxEffectLength, end - position);
            parts.Add(SubmitAsync(NbdOperation.Effect(command, position, count, flags), cancellationToken).AsTask());
        }

        await Task.WhenAll(parts).ConfigureAwait(false);
    }

    private async ValueTask FlushCoreAsync(CancellationToken cancellationToken)
    {
        var barrier = new List<Task>();
        lock (_trackLock)
        {
            for (var operation = _unacknowledged; operation is not null; operation = operation.Next)
            {
                if (operation.ChangesData)
                {
                    barrier.Add(operation.WhenFinished());
                }
            }
        }

        if (barrier.Count > 0)
        {
            await Task.WhenAll(barrier).WaitAsync(cancellationToken).ConfigureAwait(false);
        }

        // With several paths, every live one flushes: each server may have acknowledged some of the writes.
        var paths = _paths.Length == 1 ? [] : Volatile.Read(ref _eligible).Select(connection => connection.PathIndex).Distinct().ToList();
        if (paths.Count <= 1)
        {
            await SubmitAsync(NbdOperation.Effect(NbdCommand.Flush, 0, 0, CommandFlags.None), cancellationToken).ConfigureAwait(false);
            return;
        }

        await Task.WhenAll(paths.Select(path =>
        {
            var flush = NbdOperation.Effect(NbdCommand.Flush, 0, 0, CommandFlags.None);
            flush.PreferredPath = path;
            return SubmitAsync(flush, cancellationToken).AsTask();
        })).ConfigureAwait(false);
    }

    /// <summary>
    /// Tracks the request (until the server acknowledges it, across reconnections) and sends it on the least busy
    /// connection with a free slot; with none, it joins the wait queue.
    /// </summary>
    private ValueTask SubmitAsync(NbdOperation operation, CancellationToken cancellationToken)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        operation.Deadline = NbdOperation.DeadlineFrom(Options.RequestTimeout);
        Track(operation);
        operation.RegisterCancellation(cancellationToken);
        Dispatch(operation);
        return operation.AsValueTask();
    }

    private void Dispatch(NbdOperation operation)
    {
        if (Volatile.Read(ref _waitingCount) == 0 && TryPlace(operation))
        {
            return;
        }

        Exception? refusal;
        lock (_dispatchLock)
        {
            refusal = RefusalLocked();
            if (refusal is null)
            {
                if (_waitTail is null)
                {
                    _waitHead = operation;
                }
                else
                {
                    _waitTail.WaitNext = operation;
                }

                _waitTail = operation;
                _waitingCount++;
            }
        }

        if (refusal is not null)
        {
            operation.Finish(refusal is NbdConnectionException { Message: var message } && message.StartsWith("no working connection", StringComparison.Ordinal)
                ? refusal
                : NbdConnection.Wrap(operation, refusal));
            return;
        }

        // Slots may have freed up between the attempt and the queueing: nobody else would look.
        Pump();
    }

    /// <summary>
    /// Sends <paramref name="operation"/> on the eligible connection with the fewest requests in flight and a free
    /// slot (on its preferred path if it has one that works). False when every connection is full or none works.
    /// </summary>
    private bool TryPlace(NbdOperation operation)
    {
        var eligible = Volatile.Read(ref _eligible);
        for (var attempt = 0; attempt < 8 && eligible.Length > 0; attempt++)
        {
            NbdConnection? best = null;
            var preferred = operation.PreferredPath;
            var preferredLive = false;
            foreach (var connection in eligible)
            {
                if (preferred >= 0 && connection.PathIndex != preferred)
                {
                    continue;
                }

                preferredLive = true;
                if (connection.FreeSlots > 0 && (best is null || connection.InFlight < best.InFlight))
                {
                    best = connection;
                }
            }

            if (best is null)
            {
                if (preferred >= 0 && !preferredLive)
                {
                    // Its path went down: any other path's flush covers the same storage.
                    operation.PreferredPath = -1;
                    continue;
                }

                return false;
            }

            if (best.TryReserveSlot() && best.Submit(operation))
            {
                return true;
            }

            // Taken by another request, or the connection just failed or began closing: look again.
            eligible = Volatile.Read(ref _eligible);
        }

        return false;
    }

    /// <summary>Sends waiting requests, oldest first, while connections have free slots; drops those whose caller left.</summary>
    private void Pump()
    {
        List<NbdOperation>? dropped = null;
        lock (_dispatchLock)
        {
            while (_waitHead is { } operation)
            {
                var drop = operation.IsReleased;
                if (!drop && !TryPlace(operation))
                {
                    break;
                }

                if (drop)
                {
                    (dropped ??= []).Add(operation);
                }

                _waitHead = operation.WaitNext;
                operation.WaitNext = null;
                if (_waitHead is null)
                {
                    _waitTail = null;
                }

                _waitingCount--;
            }
        }

        foreach (var operation in dropped ?? [])
        {
            operation.Finish(null);
        }
    }

    private void Track(NbdOperation operation)
    {
        operation.OnFinished = _untrack;
        lock (_trackLock)
        {
            operation.Next = _unacknowledged;
            if (_unacknowledged is not null)
            {
                _unacknowledged.Previous = operation;
            }

            _unacknowledged = operation;
            _unacknowledgedCount++;
        }
    }

    private void Untrack(NbdOperation operation)
    {
        lock (_trackLock)
        {
            if (operation.Previous is null && !ReferenceEquals(_unacknowledged, operation))
            {
                return;
            }

            if (operation.Previous is not null)
            {
                operation.Previous.Next = operation.Next;
            }
            else
            {
                _unacknowledged = operation.Next;
            }

            if (operation.Next is not null)
            {
                operation.Next.Previous = operation.Previous;
            }

            operation.Previous = operation.Next = null;
            _unacknowledgedCount--;
        }
    }
}
