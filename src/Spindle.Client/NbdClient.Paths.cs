using System.Diagnostics;
using Spindle.Client.Connection;

namespace Spindle.Client;

/// <summary>One server address of a client, with its connections (one, or several with multi-conn).</summary>
internal sealed class NbdPath(int index, NbdUri uri, int connections)
{
    public int Index { get; } = index;

    public NbdUri Uri { get; } = uri;

    /// <summary>The connection in each slot; null while that slot is being reconnected.</summary>
    public NbdConnection?[] Connections { get; } = new NbdConnection?[connections];

    /// <summary>Slots whose reconnection loop is running.</summary>
    public bool[] Reconnecting { get; } = new bool[connections];

    public Exception? LastFailure { get; set; }
}

public sealed partial class NbdClient
{
    /// <summary>Guards the wait queue, the connection slots of every path and the liveness state.</summary>
    private readonly Lock _dispatchLock = new();

    /// <summary>Replaced (never changed in place) when every connection has come back with a larger export.</summary>
    private ExportInfo _export;

    /// <summary>The connections requests may go to now (rebuilt when one comes or goes; read without the lock).</summary>
    private NbdConnection[] _eligible = [];

    /// <summary>Requests waiting for a connection (none working) or for a free slot (all full): a FIFO linked through the operations.</summary>
    private NbdOperation? _waitHead;
    private NbdOperation? _waitTail;
    private int _waitingCount;

    /// <summary>Stopwatch timestamp since which no connection works; 0 while one does.</summary>
    private long _downSince;

    /// <summary>Set once <see cref="NbdClientOptions.DeadConnectionTimeout"/> passed with no connection: requests fail at once until one comes back.</summary>
    private NbdConnectionException? _dead;
    private Exception? _lastFailure;
    private long _reconnections;
    private long _resent;
    private long _blockedTicks;
    private int _nextConnectionId = 1024;

    /// <summary>Wires the first connections and starts retrying the paths that did not connect.</summary>
    private void Start()
    {
        lock (_dispatchLock)
        {
            foreach (var path in _paths)
            {
                foreach (var connection in path.Connections.OfType<NbdConnection>())
                {
                    Wire(connection);
                }
            }

            RebuildEligibleLocked();
        }

        foreach (var path in _paths)
        {
            for (var slot = 0; slot < path.Connections.Length; slot++)
            {
                if (path.Connections[slot] is null)
                {
                    if (slot == 0 && path.LastFailure is { } failure)
                    {
                        ClientLog.PathDown(_logger, path.Uri.Target, failure.Message);
                    }

                    StartReconnecting(path, slot);
                }
            }
        }
    }

    private void Wire(NbdConnection connection)
    {
        connection.Failed = OnConnectionFailed;
        connection.SlotFreed = OnSlotFreed;
        if (Options.Reconnects)
        {
            connection.ShutdownReply = OnShutdownReply;
        }
    }

    /// <summary>
    /// Rebuilds the set of connections requests may go to: every working connection when the export advertises
    /// multi-conn (the paths then share one consistent cache, as the server promises for its own connections),
    /// otherwise only those of the first working path (the others stand by).
    /// </summary>
    private void RebuildEligibleLocked()
    {
        var live = new List<NbdConnection>();
        foreach (var path in _paths)
        {
            foreach (var connection in path.Connections)
            {
                if (connection is { IsAvailable: true })
                {
                    live.Add(connection);
                }
            }

            if (live.Count > 0 && !_export.CanMultiConn)
            {
                break;
            }
        }

        Volatile.Write(ref _eligible, [.. live]);
        if (live.Count > 0)
        {
            if (_downSince != 0)
            {
                Interlocked.Add(ref _blockedTicks, Stopwatch.GetTimestamp() - _downSince);
            }

            _downSince = 0;
            _dead = null;
        }
        else if (_downSince == 0)
        {
            _downSince = Stopwatch.GetTimestamp();
        }
    }

    private void OnSlotFreed(NbdConnection connection)
    {
        if (Volatile.Read(ref _waitingCount) > 0)
        {
            Pump();
        }
    }

    /// <summary>
    /// A connection failed or closed. Without reconnection its requests fail; otherwise they wait until the
    /// connection's loops have stopped (so nothing touches their reply state), then go back to the front of the
    /// queue, and the connection's slot is reconnected.
    /// </summary>
    private void OnConnectionFailed(NbdConnection connection, IReadOnlyList<NbdOperation> unacknowledged, NbdConnectionException failure)
    {
        NbdPath? path = null;
        var slot = -1;
        lock (_dispatchLock)
        {
            if (connection.PathIndex < _paths.Length)
            {
                path = _paths[connection.PathIndex];
                slot = Array.IndexOf(path.Connections, connection);
                if (slot >= 0)
                {
                    path.Connections[slot] = null;
                    path.LastFailure = failure;
                }
            }

            _lastFailure = failure;
            if (Volatile.Read(ref _disposed) == 0)
            {
                RebuildEligibleLocked();
            }
        }

        var closing = Volatile.Read(ref _disposed) != 0;
        if (!closing && !Options.Reconnects)
        {
            FailWaitingIfNoConnection();
        }

        // A protocol violation is the server's bug, not the network's: sending the same requests again would likely
        // meet it again, so they fail (the spec's hard disconnect); later requests get a new connection.
        if (closing || !Options.Reconnects || failure is NbdProtocolException)
        {
            NbdConnection.FailAll(unacknowledged, failure);
        }
        else
        {
            ClientLog.ConnectionLost(_logger, connection.Id, connection.Server, unacknowledged.Count, failure.Message);
            _ = ResendWhenStoppedAsync(connection, unacknowledged);
        }

        if (closing || !Options.Reconnects)
        {
            return;
        }

        if (path is not null && slot >= 0)
        {
            StartReconnecting(path, slot);
        }
    }

    /// <summary>
    /// Without reconnection, requests that queued while the last connection was closing (a soft disconnect after
    /// ESHUTDOWN) would wait for a connection that never comes: they fail once none is left.
    /// </summary>
    private void FailWaitingIfNoConnection()
    {
        List<NbdOperation> waiting;
        Exception? refusal;
        lock (_dispatchLock)
        {
            refusal = RefusalLocked();
            if (refusal is null || _waitingCount == 0)
            {
                return;
            }

            waiting = TakeAllWaitingLocked();
        }

        NbdConnection.FailAll(waiting, refusal);
    }

    /// <summary>The server answered ESHUTDOWN (it is going away): the request is sent again elsewhere, not failed.</summary>
    private void OnShutdownReply(NbdConnection connection, NbdOperation operation)
    {
        // The connection is closing now: take it out of the eligible set first, or the request (which prefers its
        // path) would be offered to it again and wait for a connection that never takes it.
        lock (_dispatchLock)
        {
            if (Volatile.Read(ref _disposed) == 0)
            {
                RebuildEligibleLocked();
            }
        }

        Requeue([operation]);
    }

    private async Task ResendWhenStoppedAsync(NbdConnection connection, IReadOnlyList<NbdOperation> operations)
    {
        try
        {
            // The socket is closed, so the loops end at once; the bound only guards against a bug.
            await connection.Stopped.WaitAsync(TimeSpan.FromSeconds(30)).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            ClientLog.LoopsDidNotStop(_logger, connection.Id, connection.Server);
        }

        Requeue(operations);
    }

    /// <summary>Puts requests a lost connection had not answered back at the front of the queue, in their order.</summary>
    private void Requeue(IReadOnlyList<NbdOperation> operations)
    {
        var resend = new List<NbdOperation>(operations.Count);
        foreach (var operation in operations)
        {
            if (operation.IsReleased)
            {
                // The caller left (cancelled, timed out): nobody waits for it, so it is not sent again.
                operation.Finish(null);
            }
            else
            {
                operation.ResetForResend();
                resend.Add(operation);
            }
        }

        if (resend.Count == 0)
        {
            return;
        }

        Interlocked.Add(ref _resent, resend.Count);
        Exception? refusal;
        lock (_dispatchLock)
        {
            refusal = RefusalLocked();
            if (refusal is null)
            {
                for (var i = resend.Count - 1; i >= 0; i--)
                {
                    var operation = resend[i];
                    operation.WaitNext = _waitHead;
                    _waitHead = operation;
                    _waitTail ??= operation;
                    _waitingCount++;
                }
            }
        }

        if (refusal is not null)
        {
            NbdConnection.FailAll(resend, refusal);
            return;
        }

        Pump();
    }

    private void StartReconnecting(NbdPath path, int slot)
    {
        lock (_dispatchLock)
        {
            if (path.Reconnecting[slot] || Volatile.Read(ref _disposed) != 0 || !Options.Reconnects)
            {
                return;
            }

            path.Reconnecting[slot] = true;
        }

        _ = Task.Run(() => ReconnectAsync(path, slot));
    }

    /// <summary>
    /// Reconnects one slot of a path: at once, then with a doubling delay up to the maximum, until it works or the
    /// client closes. A server that now describes the export differently (another size, other flags, another UUID)
    /// is not used: its requests would reach another disk.
    /// </summary>
    private async Task ReconnectAsync(NbdPath path, int slot)
    {
        var started = Stopwatch.GetTimestamp();
        var delay = TimeSpan.Zero;
        var attempts = 0;
        string? lastReported = null;
        var token = _closing.Token;
        try
        {
            while (!token.IsCancellationRequested)
            {
                if (delay > TimeSpan.Zero)
                {
                    await Task.Delay(delay, token).ConfigureAwait(false);
                }

                delay = delay == TimeSpan.Zero ? Options.ReconnectDelay : TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, Options.MaxReconnectDelay.Ticks));
                attempts++;
                NbdConnection connection;
                try
                {
                    connection = await NbdConnection.ConnectAsync(path.Uri, Options, Interlocked.Increment(ref _nextConnectionId), _logger, token).ConfigureAwait(false);
                }
                catch (Exception exception) when (exception is NbdException or IOException or TimeoutException && !token.IsCancellationRequested)
                {
                    Record(path, exception, ref lastReported);
                    continue;
                }

                if (Disagreement(_export, connection.Export) is { } problem)
                {
                    await connection.DisposeAsync().ConfigureAwait(false);
                    var refused = new NbdConnectionException($"{path.Uri.Target} now serves a different export under '{path.Uri.ExportName}' ({problem}), so the client does not use it");
                    Record(path, refused, ref lastReported);
                    continue;
                }

                if (Install(path, slot, connection))
                {
                    Interlocked.Increment(ref _reconnections);
                    ClientLog.Reconnected(_logger, connection.Id, connection.Server, Stopwatch.GetElapsedTime(started).TotalSeconds, attempts);
                    Pump();
                }
                else
                {
                    await connection.DisposeAsync().ConfigureAwait(false);
                }

                return;
            }
        }
        catch (OperationCanceledException) when (token.IsCancellationRequested)
        {
        }
        finally
        {
            lock (_dispatchLock)
            {
                path.Reconnecting[slot] = false;
            }
        }
    }

    private void Record(NbdPath path, Exception failure, ref string? lastReported)
    {
        lock (_dispatchLock)
        {
            path.LastFailure = failure;
            _lastFailure = failure;
        }

        // Each new reason once: a server that stays down does not fill the log.
        if (failure.Message != lastReported)
        {
            lastReported = failure.Message;
            ClientLog.ReconnectFailed(_logger, path.Uri.Target, failure.Message);
        }
    }

    /// <summary>Puts a new connection in its slot; false if the client closed meanwhile.</summary>
    private bool Install(NbdPath path, int slot, NbdConnection connection)
    {
        connection.PathIndex = path.Index;
        Wire(connection);
        ExportSizeChangedEventArgs? grown;
        lock (_dispatchLock)
        {
            if (Volatile.Read(ref _disposed) != 0)
            {
                return false;
            }

            path.Connections[slot] = connection;
            RebuildEligibleLocked();
            grown = TakeLargerSizeLocked();
        }

        if (grown is { } change)
        {
            ClientLog.ExportGrew(_logger, Uri.Target, change.OldSize, change.NewSize);
            SizeChanged?.Invoke(this, change);
        }

        return true;
    }

    /// <summary>Why a request cannot wait for a connection: the client is closed, or dead, or does not reconnect and has none.</summary>
    private NbdConnectionException? RefusalLocked()
    {
        if (Volatile.Read(ref _disposed) != 0)
        {
            return new NbdConnectionException($"the client for {Uri} has been closed");
        }

        if (_dead is not null)
        {
            return _dead;
        }

        if (!Options.Reconnects && !Array.Exists(_eligible, connection => connection.IsAvailable))
        {
            var reason = _lastFailure?.Message ?? _paths[0].Connections.OfType<NbdConnection>().Select(c => c.UnavailableReason).FirstOrDefault(r => r is not null) ?? "unknown";
            return _lastFailure is not null
                ? new NbdConnectionException($"no working connection to {Uri.Target}: {reason}", _lastFailure)
                : new NbdConnectionException($"no working connection to {Uri.Target}: {reason}");
        }

        return null;
    }

    private List<NbdOperation> TakeAllWaitingLocked()
    {
        var taken = new List<NbdOperation>(_waitingCount);
        for (var operation = _waitHead; operation is not null;)
        {
            var next = operation.WaitNext;
            operation.WaitNext = null;
            taken.Add(operation);
            operation = next;
        }

        _waitHead = _waitTail = null;
        _waitingCount = 0;
        return taken;
    }

    /// <summary>
    /// Every tick: requests waiting past their <see cref="NbdClientOptions.RequestTimeout"/> are released, and once no
    /// connection has worked for <see cref="NbdClientOptions.DeadConnectionTimeout"/> every waiting request fails.
    /// </summary>
    private void OnTimer()
    {
        if (Volatile.Read(ref _disposed) != 0)
        {
            return;
        }

        List<NbdOperation>? expired = null;
        List<NbdOperation>? failed = null;
        NbdConnectionException? dead = null;
        var now = Stopwatch.GetTimestamp();
        lock (_dispatchLock)
        {
            if (Options.RequestTimeout != Timeout.InfiniteTimeSpan)
            {
                for (var operation = _waitHead; operation is not null; operation = operation.WaitNext)
                {
                    if (operation.Deadline != 0 && now > operation.Deadline && !operation.IsReleased)
                    {
                        (expired ??= []).Add(operation);
                    }
                }
            }

            var timeout = Options.DeadConnectionTimeout;
            if (_dead is null && _downSince != 0 && timeout != Timeout.InfiniteTimeSpan && Options.Reconnects &&
                Stopwatch.GetElapsedTime(_downSince, now) > timeout)
            {
                var targets = string.Join(", ", _paths.Select(path => path.Uri.Target));
                var reason = _lastFailure?.Message ?? "unknown";
                _dead = dead = _lastFailure is null
                    ? new NbdConnectionException($"no connection to {targets} for {timeout.TotalSeconds:0.###} s (the dead-connection timeout): {reason}")
                    : new NbdConnectionException($"no connection to {targets} for {timeout.TotalSeconds:0.###} s (the dead-connection timeout): {reason}", _lastFailure);
                failed = TakeAllWaitingLocked();
            }
        }

        foreach (var operation in expired ?? [])
        {
            operation.Abandon(new TimeoutException($"{operation}: no reply within {Options.RequestTimeout.TotalSeconds:0.###} s (it is still waiting for a connection or a free request slot)"));
        }

        if (dead is not null)
        {
            ClientLog.ConnectionDead(_logger, dead.Message, failed!.Count);
            NbdConnection.FailAll(failed, dead);
        }

        if (expired is not null)
        {
            Pump();
        }
    }
}
