namespace Spindle.Server.Connections;

/// <summary>
/// Bounds what one connection holds in flight: a number of requests and a number of payload bytes. The reader
/// waits for room before it reads a request's payload, so a client that sends faster than the backend works meets
/// TCP backpressure instead of growing the server's memory. A single request bigger than the byte bound is
/// admitted when nothing else is in flight, so every legal request can make progress.
/// </summary>
/// <remarks>Only the connection's reader acquires, so there is at most one waiter; releases come from any thread.</remarks>
internal sealed class FlowBudget : IDisposable
{
    private readonly FlowBudget? _shared;
    private readonly int _maxRequests;
    private readonly long _maxBytes;
    private readonly Lock _lock = new();
    private readonly SemaphoreSlim _released = new(0);
    private bool _waiting;
    private bool _sharedShortage;
    private int _requests;
    private long _bytes;

    /// <param name="maxRequests">Requests in flight at most.</param>
    /// <param name="maxBytes">Payload bytes in flight at most (one request alone may exceed it).</param>
    /// <param name="shared">A server-wide budget whose bytes this one also draws on; its request count is not limited.</param>
    public FlowBudget(int maxRequests, long maxBytes, FlowBudget? shared = null)
    {
        _maxRequests = maxRequests;
        _maxBytes = maxBytes;
        _shared = shared;
    }

    public int Requests => Volatile.Read(ref _requests);

    /// <summary>Payload bytes held now.</summary>
    public long Bytes => Volatile.Read(ref _bytes);

    /// <summary>Takes room for one request of <paramref name="bytes"/> payload bytes if there is some now.</summary>
    public bool TryAcquire(long bytes)
    {
        lock (_lock)
        {
            return TryTake(bytes);
        }
    }

    /// <summary>Takes room, waiting until there is some (the reader waits through its transport's ReaderWaitAsync).</summary>
    public async ValueTask AcquireAsync(long bytes, CancellationToken cancellationToken)
    {
        while (!TryAcquireOrArm(bytes))
        {
            // A shortage of the shared budget is not signalled to each connection: look again every few milliseconds.
            await _released.WaitAsync(_sharedShortage ? 5 : Timeout.Infinite, cancellationToken).ConfigureAwait(false);
        }
    }

    public void Release(long bytes)
    {
        _shared?.Release(bytes);
        lock (_lock)
        {
            _requests--;
            _bytes -= bytes;
            if (_waiting)
            {
                _waiting = false;
                _released.Release();
            }
        }
    }

    /// <summary>Waits until no request is in flight.</summary>
    public async ValueTask WaitForIdleAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            lock (_lock)
            {
                if (_requests == 0)
                {
                    return;
                }

                _waiting = true;
            }

            await _released.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    public void Dispose() => _released.Dispose();

    private bool TryAcquireOrArm(long bytes)
    {
        lock (_lock)
        {
            _sharedShortage = false;
            if (TryTake(bytes))
            {
                return true;
            }

            _waiting = true;
            return false;
        }
    }

    private bool TryTake(long bytes)
    {
        if (_requests >= _maxRequests || (_requests > 0 && _bytes + bytes > _maxBytes))
        {
            return false;
        }

        if (_shared is not null && !_shared.TryAcquire(bytes))
        {
            // Room here but not server-wide: wait for this connection's own releases, or poll the shared budget.
            _sharedShortage = true;
            return false;
        }

        _requests++;
        _bytes += bytes;
        return true;
    }
}
