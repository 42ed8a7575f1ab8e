using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;
using Spindle.Client.Connection;
using Spindle.Protocol;

namespace Spindle.Client;

public sealed partial class NbdClient
{
    /// <summary>The longest TRIM / WRITE_ZEROES / CACHE / BLOCK_STATUS in one request: 32 bits, aligned to the minimum block.</summary>
    private long MaxEffectLength => uint.MaxValue - (uint.MaxValue % Export.MinimumBlockSize);

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

        await SubmitAsync(NbdOperation.Effect(NbdCommand.Flush, 0, 0, CommandFlags.None), cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Tracks the request, picks the least busy working connection, waits for a slot there and sends.</summary>
    private ValueTask SubmitAsync(NbdOperation operation, CancellationToken cancellationToken)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            return ValueTask.FromCanceled(cancellationToken);
        }

        Track(operation);
        NbdConnection connection;
        ValueTask slot;
        try
        {
            connection = PickConnection();
            slot = connection.AcquireSlotAsync(cancellationToken);
            if (slot.IsCompletedSuccessfully)
            {
                connection.Submit(operation, cancellationToken);
                return operation.AsValueTask();
            }
        }
        catch (Exception exception)
        {
            Untrack(operation);
            return ValueTask.FromException(exception);
        }

        return SubmitSlowAsync(connection, slot, operation, cancellationToken);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask SubmitSlowAsync(NbdConnection connection, ValueTask slot, NbdOperation operation, CancellationToken cancellationToken)
    {
        try
        {
            await slot.ConfigureAwait(false);
            connection.Submit(operation, cancellationToken);
        }
        catch
        {
            Untrack(operation);
            throw;
        }

        await operation.AsValueTask().ConfigureAwait(false);
    }

    private NbdConnection PickConnection()
    {
        NbdConnection? best = null;
        foreach (var connection in _connections)
        {
            if (connection.IsAvailable && (best is null || connection.InFlight < best.InFlight))
            {
                best = connection;
            }
        }

        if (best is not null)
        {
            return best;
        }

        if (Volatile.Read(ref _disposed) != 0)
        {
            throw new ObjectDisposedException(nameof(NbdClient), $"the client for {Uri} has been closed");
        }

        var failure = _connections[0].Failure;
        var reason = _connections[0].UnavailableReason ?? "unknown";
        throw failure is not null
            ? new NbdConnectionException($"no working connection to {Uri.Target}: {reason}", failure)
            : new NbdConnectionException($"no working connection to {Uri.Target}: {reason}");
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

    /// <summary>
    /// A connection failed: its unacknowledged requests come here. This client fails them with the connection's
    /// error (each still knows everything needed to be sent again: the hook a reconnecting client will use).
    /// </summary>
    private void OnConnectionFailed(NbdConnection connection, IReadOnlyList<NbdOperation> unacknowledged, NbdConnectionException failure)
    {
        foreach (var operation in unacknowledged)
        {
            operation.Finish(NbdConnection.Wrap(operation, failure));
        }
    }
}
