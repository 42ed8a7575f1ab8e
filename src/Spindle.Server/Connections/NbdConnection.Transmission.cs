using System.Diagnostics;
using Spindle.Protocol;
using Spindle.Server.Diagnostics;
using Spindle.Server.Logging;
using Spindle.Server.Negotiation;
using Spindle.Storage;
using Spindle.Wire;

namespace Spindle.Server.Connections;

/// <summary>
/// The transmission phase: one reader parses requests and hands them to the thread pool (or runs the last of a
/// burst itself); each request executes against the backend and queues its reply on the <see cref="ReplyWriter"/>.
/// Replies go out in completion order, matched by cookie.
/// </summary>
internal sealed partial class NbdConnection
{
    /// <summary>Replies of a burst sent together, at most; then they go out and the burst goes on.</summary>
    private const int ReplyGroup = 8;

    /// <summary>Payload bytes of a burst's replies sent together, at most.</summary>
    private const long ReplyGroupBytes = 256 * 1024;

    /// <summary>
    /// Requests larger than this always go to the pool. Up to here they run on the connection's thread when they can
    /// (page-cache reads, buffered writes): a pool hop per 256 KiB or 1 MiB request costs more than the copy it would
    /// overlap. Raising this from 128 KiB to 1 MiB cut the server's CPU per nbdcopy of 1 GiB over four connections
    /// from 0.77-0.88 s to 0.60 s and its peak RSS from 218-252 MiB to 110-118 MiB, and 1 MiB writes at QD8 from
    /// 504-673 to 281 us of CPU each (docs/performance-notes.md). A large READ is the exception while fewer
    /// connections than cores are busy: see <see cref="MaxImmediateReadBytesFewConnections"/>.
    /// </summary>
    private const int MaxImmediateBytes = 1024 * 1024;

    /// <summary>
    /// READs larger than this go to the pool while the server has fewer connections than cores: one client streaming
    /// 1 MiB reads at QD8 then has its copies out of the page cache overlap with the sends on another core (2934 MiB/s
    /// against 2360 with every read inline, same run). With as many connections as cores, the connections' own
    /// threads already keep the cores busy and the hop only costs.
    /// </summary>
    private const int MaxImmediateReadBytesFewConnections = 128 * 1024;

    private readonly Stack<TransmissionRequest> _freeRequests = new();
    private readonly Lock _freeLock = new();
    private FlowBudget? _budget;
    private ReplyWriter? _writer;
    private CancellationTokenSource? _stopReading;
    private long _lastActivity;
    private int _idleClosed;
    private volatile bool _draining;

    /// <summary>True once <see cref="Drain"/> was called.</summary>
    internal bool IsDraining => _draining;

    /// <summary>The device this connection works on: the export's, or one of its own (BlockDevice.OpenConnectionAsync).</summary>
    private BlockDevice? _device;

    /// <summary>The device of this connection's own, disposed once when the connection ends (or is torn down).</summary>
    private BlockDevice? _ownDevice;

    private async Task<string> RunTransmissionAsync()
    {
        var export = _export!;
        var device = await export.Device.OpenConnectionAsync(_abort.Token).ConfigureAwait(false);
        _device = device;
        _ownDevice = ReferenceEquals(device, export.Device) ? null : device;
        _budget = new FlowBudget(_options.MaxRequestsInFlight, _options.MaxBytesInFlight, _server.SharedBudget);
        Touch();
        _writer = new ReplyWriter(_transport, ReleaseRequest, OnWriterFault);

        // The handshake's final reply (EXPORT_NAME's) may still be buffered.
        await _negotiator.FlushAsync(_abort.Token).ConfigureAwait(false);

        // When the server stops, the reader goes on answering new requests with ESHUTDOWN (a client then disconnects
        // itself) until those in flight are done; then it stops reading: its receive is woken with end of stream.
        using var reading = CancellationTokenSource.CreateLinkedTokenSource(_abort.Token);
        _stopReading = reading;
        using var wake = reading.Token.UnsafeRegister(static state => ((Transport)state!).CancelReceive(), _transport);
        using var onStop = _server.StoppingToken.UnsafeRegister(static state => _ = ((NbdConnection)state!).StopReadingWhenIdleAsync(), this);
        using var onDrain = export.DrainToken.UnsafeRegister(static state => ((NbdConnection)state!).Drain(), this);
        string reason;
        try
        {
            reason = await ReadRequestsAsync(device, reading.Token).ConfigureAwait(false);
        }
        catch (Exception exception) when (IsDisconnect(exception))
        {
            reason = _writer.IsFaulted ? "send failed" : "peer disconnected";
        }
        finally
        {
            _writer.Release();
        }

        if (_server.StoppingToken.IsCancellationRequested && !_abort.IsCancellationRequested)
        {
            reason = "server stopping";
        }
        else if (Volatile.Read(ref _idleClosed) != 0)
        {
            reason = "idle timeout";
        }
        else if (_draining && !_abort.IsCancellationRequested)
        {
            reason = "drained";
        }

        // Everything already dispatched finishes and is answered (or dropped if the peer is gone) before closing.
        await _transport.ReaderWaitAsync(_budget.WaitForIdleAsync(_server.AbortToken)).ConfigureAwait(false);
        if (!_writer.IsFaulted)
        {
            await _transport.ShutdownSendAsync().ConfigureAwait(false);
        }

        _budget.Dispose();
        // Nothing is in flight any more: a per-connection device (an overlay) can go.
        await ReleaseOwnDeviceAsync().ConfigureAwait(false);
        return reason;
    }

    /// <summary>Disposes the connection's own device, if it has one, exactly once.</summary>
    private ValueTask ReleaseOwnDeviceAsync()
    {
        var own = Interlocked.Exchange(ref _ownDevice, null);
        return own is null ? ValueTask.CompletedTask : own.DisposeAsync();
    }

    /// <summary>
    /// The reader: parses every request already received, runs those the backend can do at once on this thread and
    /// hands the rest to the pool, and sends the burst's replies together before it waits for more.
    /// </summary>
    private async Task<string> ReadRequestsAsync(BlockDevice device, CancellationToken cancellationToken)
    {
        var input = _input;
        var writer = _writer!;
        var budget = _budget!;
        var extended = _negotiator.ExtendedHeaders;
        var headerLength = NbdRequest.HeaderLengthFor(extended);
        var heldReplies = 0;
        var heldBytes = 0L;
        while (true)
        {
            if (input.Count < headerLength)
            {
                // About to wait for the client: everything answered so far goes out now.
                writer.Release();
                heldReplies = 0;
                heldBytes = 0;
                if (!await input.TryEnsureAsync(headerLength, cancellationToken).ConfigureAwait(false))
                {
                    return "peer closed";
                }
            }

            writer.Hold();
            Touch();
            if (NbdRequest.TryRead(input.Span, extended, out var request) != ParseStatus.Done)
            {
                ServerLog.ProtocolViolation(_logger, Id, Peer, $"request does not start with {(extended ? "NBD_EXTENDED_REQUEST_MAGIC" : "NBD_REQUEST_MAGIC")}; the stream is out of step");
                return "bad request magic";
            }

            input.Consume(headerLength);
            if (request.Command == NbdCommand.Disconnect)
            {
                ServerLog.SoftDisconnect(_logger, Id, Peer, "NBD_CMD_DISC");
                return "NBD_CMD_DISC";
            }

            if (request.HasPayload && request.WirePayloadLength > (ulong)_options.MaxDiscardedPayload)
            {
                // Limit, then discard: a payload this large is an attack, not a mistake (proto.md §"Size constraints").
                ServerLog.ProtocolViolation(_logger, Id, Peer, $"{request} carries {request.WirePayloadLength} bytes, too many to discard");
                return "oversized payload";
            }

            string? reason = null;
            var payloadLeft = request.WirePayloadLength;
            var effectLength = request.HasPayload && request.Command != NbdCommand.Write ? 0 : request.LongLength;
            IReadOnlyList<SelectedContext> contexts = _negotiator.Contexts;
            var error = _server.IsStopping || _draining ? NbdError.Shutdown : CheckPayload(request, out reason);
            if (error == NbdError.None && request.HasPayload && request.Command == NbdCommand.BlockStatus)
            {
                writer.Release();
                (error, reason, effectLength, contexts) = await ReadStatusPayloadAsync(request, cancellationToken).ConfigureAwait(false);
                payloadLeft = 0;
            }

            if (error == NbdError.None)
            {
                error = Validate(request, effectLength, out reason);
            }

            if (error != NbdError.None)
            {
                if (payloadLeft > 0)
                {
                    // The refused request's data is still read, so the next header is where it should be.
                    writer.Release();
                    await input.DiscardAsync((long)payloadLeft, "a refused request's payload", cancellationToken).ConfigureAwait(false);
                }

                if (error != NbdError.Shutdown)
                {
                    ServerLog.RequestRefused(_logger, Id, Peer, request, error.ToErrnoName(), reason!);
                }

                await AcquireAsync(budget, 0, cancellationToken).ConfigureAwait(false);
                var refused = RentRequest(request, effectLength, contexts);
                refused.Fail(error, error == NbdError.Shutdown ? "the server is shutting down" : reason, fromBackend: false);
                refused.BuildError(_negotiator.StructuredReplies);
                Account(refused);
                writer.Enqueue(refused);
                continue;
            }

            var payloadBytes = request.Command is NbdCommand.Read or NbdCommand.Write ? (int)effectLength : 0;
            await AcquireAsync(budget, payloadBytes, cancellationToken).ConfigureAwait(false);
            var work = RentRequest(request, effectLength, contexts);
            work.BudgetBytes = payloadBytes;
            work.RentPayload(payloadBytes);
            if (request.Command == NbdCommand.Write)
            {
                try
                {
                    if (input.Count < payloadBytes)
                    {
                        writer.Release();
                    }

                    await input.ReadExactlyAsync(work.PayloadMemory, "a write's payload", cancellationToken).ConfigureAwait(false);
                }
                catch
                {
                    // The peer vanished mid-payload: this request never runs, so give back its budget and buffer.
                    ReleaseRequest(work);
                    throw;
                }
            }

            if (MayRunImmediately(request.Command, payloadBytes) && TryExecuteImmediately(work, device))
            {
                // Let the replies of a long burst go out in groups, so the client can work on them (and send more)
                // while this thread carries on, instead of waiting for the whole burst.
                if (++heldReplies >= ReplyGroup || (heldBytes += payloadBytes) >= ReplyGroupBytes)
                {
                    writer.Release();
                    writer.Hold();
                    heldReplies = 0;
                    heldBytes = 0;
                }
            }
            else
            {
                if (device.SubmitsWithoutBlocking && request.Command != NbdCommand.BlockStatus && request.Command != NbdCommand.Cache)
                {
                    // The backend only queues the work: submit it from here; its completion sends the reply.
                    Execute(work);
                }
                else
                {
                    ThreadPool.UnsafeQueueUserWorkItem(work, preferLocal: false);
                }
            }
        }
    }

    /// <summary>
    /// Drains the connection (its export was removed, or an operator disconnects the client): what is in flight
    /// finishes and is answered, every new request gets ESHUTDOWN (proto.md: the server "is in the process of being
    /// shut down"; a client then disconnects, and Spindle's reconnects), then the server stops reading and closes.
    /// </summary>
    internal void Drain()
    {
        if (_draining)
        {
            return;
        }

        _draining = true;
        if (InTransmission && _budget is not null)
        {
            _ = StopReadingWhenIdleAsync();
        }
        else
        {
            // Still negotiating: nothing is in flight, so there is nothing to finish.
            Abort();
        }
    }

    /// <summary>
    /// Counts an answered request for the metrics: its command, what it moved, its error, and (only when something
    /// listens to the histogram) how long it took from being parsed to its reply being queued.
    /// </summary>
    private void Account(TransmissionRequest work)
    {
        var header = work.Header;
        var slot = CommandCounters.SlotOf(header.Command);
        Counters.Record(slot, (long)work.EffectLength, work.Error);
        if (work.Started != 0)
        {
            _server.Metrics.RecordDuration(_export!.Name, slot, Stopwatch.GetElapsedTime(work.Started).TotalSeconds);
        }
    }

    /// <summary>When the connection last received a request (Environment.TickCount64).</summary>
    internal long LastActivity => Volatile.Read(ref _lastActivity);

    /// <summary>True when the connection is in transmission with nothing in flight.</summary>
    internal bool IsQuiet => InTransmission && _budget is { Requests: 0 };

    /// <summary>Closes a connection that has been idle too long: it stops reading, then closes as after a disconnect.</summary>
    internal void CloseIdle(TimeSpan timeout)
    {
        if (Interlocked.Exchange(ref _idleClosed, 1) == 0)
        {
            ServerLog.IdleTimeout(_logger, Id, Peer, timeout.TotalSeconds);
            try
            {
                _stopReading?.Cancel();
            }
            catch (ObjectDisposedException)
            {
            }
        }
    }

    private void Touch() => Volatile.Write(ref _lastActivity, Environment.TickCount64);

    /// <summary>
    /// Server stop: wait (boundedly) for the requests in flight, give a client that was told ESHUTDOWN a moment to send
    /// its disconnect, then stop reading.
    /// </summary>
    private async Task StopReadingWhenIdleAsync()
    {
        try
        {
            var deadline = DateTime.UtcNow + _options.ShutdownTimeout;
            while (_budget!.Requests > 0 && DateTime.UtcNow < deadline)
            {
                await Task.Delay(5).ConfigureAwait(false);
            }

            await Task.Delay(50).ConfigureAwait(false);
            await _stopReading!.CancelAsync().ConfigureAwait(false);
        }
        catch (ObjectDisposedException)
        {
            // The connection ended first.
        }
    }

    /// <summary>Takes budget for a request; if it must wait, the held replies go out first (they are what frees it).</summary>
    private ValueTask AcquireAsync(FlowBudget budget, long bytes, CancellationToken cancellationToken)
    {
        if (budget.TryAcquire(bytes))
        {
            return ValueTask.CompletedTask;
        }

        _writer!.Release();
        return _transport.ReaderWaitAsync(budget.AcquireAsync(bytes, cancellationToken));
    }

    /// <summary>
    /// Runs a request on the reader's own thread when the backend can do it without waiting for a device (cached
    /// reads, buffered writes, anything on a memory disk). Everything else may block and goes to the pool.
    /// </summary>
    /// <summary>Whether a request of this size may run on the connection's thread (see <see cref="MaxImmediateBytes"/>).</summary>
    private bool MayRunImmediately(NbdCommand command, int payloadBytes) =>
        payloadBytes <= MaxImmediateReadBytesFewConnections
        || (payloadBytes <= MaxImmediateBytes && (command != NbdCommand.Read || _server.ConnectionCount >= Environment.ProcessorCount));

    private bool TryExecuteImmediately(TransmissionRequest work, BlockDevice device)
    {
        var request = work.Header;
        try
        {
            switch (request.Command)
            {
                case NbdCommand.Read when work.EffectLength == 0 || device.TryReadImmediate((long)request.Offset, work.PayloadMemory.Span):
                    break;
                case NbdCommand.Write when (request.Flags & CommandFlags.Fua) == 0
                                           && (work.EffectLength == 0 || device.TryWriteImmediate((long)request.Offset, work.PayloadMemory.Span)):
                    break;
                default:
                    return false;
            }
        }
        catch (Exception exception)
        {
            Complete(work, exception);
            return true;
        }

        Complete(work, null);
        return true;
    }

    /// <summary>
    /// Checks a request against the negotiated flags and the export, in the order the spec implies: unknown command
    /// or flag (EINVAL), writes to a read-only export (EPERM), size and alignment (EINVAL), range (ENOSPC for writes,
    /// EINVAL for the rest).
    /// </summary>
    private NbdError Validate(in NbdRequest request, ulong length, out string? reason)
    {
        var command = request.Command;
        if (command is not (NbdCommand.Read or NbdCommand.Write or NbdCommand.Flush or NbdCommand.Trim or NbdCommand.Cache
            or NbdCommand.WriteZeroes or NbdCommand.BlockStatus))
        {
            reason = $"unknown command {(ushort)command}";
            return NbdError.InvalidArgument;
        }

        var flags = _negotiator.Flags;
        var allowed = (flags & TransmissionFlags.SendFua) != 0 ? CommandFlags.Fua : CommandFlags.None;
        switch (command)
        {
            case NbdCommand.Read when (flags & TransmissionFlags.SendDf) != 0:
                allowed |= CommandFlags.DontFragment;
                break;
            case NbdCommand.WriteZeroes:
                allowed |= CommandFlags.NoHole;
                if ((flags & TransmissionFlags.SendFastZero) != 0)
                {
                    allowed |= CommandFlags.FastZero;
                }

                break;
            case NbdCommand.BlockStatus:
                allowed |= CommandFlags.RequestOne;
                break;
        }

        if (request.IsExtended && command is NbdCommand.Write or NbdCommand.BlockStatus)
        {
            // Its payload (checked in CheckPayload) is how the command says what it carries.
            allowed |= CommandFlags.PayloadLength;
        }

        if ((request.Flags & ~allowed) != 0)
        {
            reason = $"flags {request.Flags & ~allowed} are not valid for {command} on this connection";
            return NbdError.InvalidArgument;
        }

        var export = _export!;
        if (command is NbdCommand.Write or NbdCommand.Trim or NbdCommand.WriteZeroes && export.IsReadOnly)
        {
            reason = $"export '{export.Name}' is read-only";
            return NbdError.NotPermitted;
        }

        var advertised = command switch
        {
            NbdCommand.Flush => TransmissionFlags.SendFlush,
            NbdCommand.Trim => TransmissionFlags.SendTrim,
            NbdCommand.WriteZeroes => TransmissionFlags.SendWriteZeroes,
            NbdCommand.Cache => TransmissionFlags.SendCache,
            _ => TransmissionFlags.None,
        };
        if ((flags & advertised) != advertised)
        {
            reason = $"{command} was not advertised for this export";
            return NbdError.InvalidArgument;
        }

        if (command == NbdCommand.BlockStatus && _negotiator.Contexts.Count == 0)
        {
            reason = "no metadata context was negotiated for this export";
            return NbdError.InvalidArgument;
        }

        if (command == NbdCommand.Flush)
        {
            if (request.Offset != 0 || length != 0)
            {
                reason = "FLUSH must have offset and length 0";
                return NbdError.InvalidArgument;
            }

            reason = null;
            return NbdError.None;
        }

        // READ and WRITE move data; a compact CACHE keeps its old bound. Extended TRIM, WRITE_ZEROES, CACHE and
        // BLOCK_STATUS may cover a whole multi-terabyte export in one request.
        if ((command is NbdCommand.Read or NbdCommand.Write || (command == NbdCommand.Cache && !request.IsExtended)) && length > (uint)_options.MaxPayload)
        {
            reason = $"length {length} exceeds the maximum block size {_options.MaxPayload}";
            return NbdError.InvalidArgument;
        }

        var minimum = export.BlockSizes.Minimum;
        if (minimum > 1 && (request.Offset % minimum != 0 || length % minimum != 0))
        {
            reason = $"offset {request.Offset} and length {length} must be multiples of the minimum block size {minimum}";
            return NbdError.InvalidArgument;
        }

        // The size this client negotiated, or less if the device has shrunk since (a resized RBD image): a grown device
        // does not widen an open connection, which was never told, and a shrunk one answers past its end with an error.
        var negotiated = (ulong)_negotiator.NegotiatedSize;
        var current = (ulong)(_device ?? export.Device).Size;
        var size = Math.Min(negotiated, current);
        if (request.Offset > size || length > size - request.Offset)
        {
            reason = current < negotiated
                ? $"range {request.Offset}+{length} is beyond the end of the export, which shrank from {negotiated} to {current} bytes"
                : $"range {request.Offset}+{length} is beyond the end of the export ({size} bytes)";
            return command is NbdCommand.Write or NbdCommand.WriteZeroes ? NbdError.NoSpace : NbdError.InvalidArgument;
        }

        if (command == NbdCommand.BlockStatus && length == 0)
        {
            reason = "BLOCK_STATUS needs a non-zero length";
            return NbdError.InvalidArgument;
        }

        reason = null;
        return NbdError.None;
    }

    /// <summary>Runs a validated request against the backend and queues its reply.</summary>
    internal void Execute(TransmissionRequest work)
    {
        ValueTask operation;
        try
        {
            operation = Start(work);
        }
        catch (Exception exception)
        {
            Complete(work, exception);
            return;
        }

        if (operation.IsCompletedSuccessfully)
        {
            Complete(work, null);
        }
        else
        {
            _ = CompleteAsync(work, operation);
        }
    }

    private ValueTask Start(TransmissionRequest work)
    {
        var request = work.Header;
        var device = _device!;
        var offset = (long)request.Offset;
        var length = (long)work.EffectLength;
        var fua = (request.Flags & CommandFlags.Fua) != 0;
        var token = _server.AbortToken;
        switch (request.Command)
        {
            case NbdCommand.Read:
                return length == 0 ? ValueTask.CompletedTask : device.ReadAsync(offset, work.PayloadMemory, token);
            case NbdCommand.Write:
                return length == 0 ? ValueTask.CompletedTask : device.WriteAsync(offset, work.PayloadMemory, fua, token);
            case NbdCommand.Flush:
                return device.FlushAsync(token);
            case NbdCommand.Trim:
                return length == 0 ? ValueTask.CompletedTask : device.TrimAsync(offset, length, fua, token);
            case NbdCommand.WriteZeroes:
                if (length == 0)
                {
                    return ValueTask.CompletedTask;
                }

                var zeroFlags = (fua ? ZeroFlags.Fua : ZeroFlags.None) |
                                ((request.Flags & CommandFlags.NoHole) != 0 ? ZeroFlags.NoHole : ZeroFlags.None) |
                                ((request.Flags & CommandFlags.FastZero) != 0 ? ZeroFlags.FastOnly : ZeroFlags.None);
                return device.WriteZeroesAsync(offset, length, zeroFlags, token);
            case NbdCommand.Cache:
                return length == 0 ? ValueTask.CompletedTask : device.CacheAsync(offset, length, token);
            case NbdCommand.BlockStatus:
                return CollectStatusAsync(work, device, token);
            default:
                throw new BlockDeviceException(NbdError.InvalidArgument, $"unknown command {request.Command}");
        }
    }

    private async Task CompleteAsync(TransmissionRequest work, ValueTask operation)
    {
        Exception? failure = null;
        try
        {
            await operation.ConfigureAwait(false);
        }
        catch (Exception exception)
        {
            failure = exception;
        }

        Complete(work, failure);
    }

    private void Complete(TransmissionRequest work, Exception? failure)
    {
        var request = work.Header;
        if (failure is null && request.Command == NbdCommand.BlockStatus)
        {
            failure = CheckStatus(work);
        }

        if (failure is not null)
        {
            var (error, message) = Classify(failure);
            ServerLog.RequestFailed(_logger, Id, Peer, request, error.ToErrnoName(), message);
            work.Fail(error, message, fromBackend: true);
            work.BuildError(_negotiator.StructuredReplies);
        }
        else
        {
            switch (request.Command)
            {
                case NbdCommand.Read:
                    work.BuildReadSuccess(_negotiator.StructuredReplies, (request.Flags & CommandFlags.DontFragment) != 0);
                    break;
                case NbdCommand.BlockStatus:
                    work.BuildBlockStatus((request.Flags & CommandFlags.RequestOne) != 0);
                    break;
                default:
                    work.BuildSimpleSuccess();
                    break;
            }
        }

        Account(work);
        _writer!.Enqueue(work);
    }

    private static (NbdError Error, string Message) Classify(Exception exception) => exception switch
    {
        BlockDeviceException device => (device.Error, device.Message),
        OperationCanceledException => (NbdError.Shutdown, "the server is shutting down"),
        IOException io => (Errno.ToNbdError(io.HResult), io.Message),
        UnauthorizedAccessException access => (NbdError.NotPermitted, access.Message),
        _ => (NbdError.IO, $"internal error: {exception.GetType().Name}: {exception.Message}"),
    };

    private TransmissionRequest RentRequest(in NbdRequest request, ulong effectLength, IReadOnlyList<SelectedContext> contexts)
    {
        TransmissionRequest? work;
        lock (_freeLock)
        {
            _freeRequests.TryPop(out work);
        }

        work ??= new TransmissionRequest(this);

        work.Header = request;
        work.EffectLength = effectLength;
        work.Contexts = contexts;
        work.Started = _server.Metrics.TimesRequests ? Stopwatch.GetTimestamp() : 0;
        return work;
    }

    private void ReleaseRequest(TransmissionRequest work)
    {
        var bytes = work.BudgetBytes;
        work.Reset();
        lock (_freeLock)
        {
            _freeRequests.Push(work);
        }

        _budget!.Release(bytes);
    }

    private void OnWriterFault(Exception exception)
    {
        if (!IsDisconnect(exception))
        {
            ServerLog.ConnectionFailed(_logger, Id, Peer, exception);
        }

        // Stop the reader too: nothing more can be answered.
        Abort();
    }
}
