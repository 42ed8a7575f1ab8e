using System.Threading.Tasks.Sources;

namespace Spindle.Server.Connections;

/// <summary>
/// Bounds what one connection holds in flight: a number of requests and a number of payload bytes. The reader
/// waits for room before it reads a request's payload, so a client that sends faster than the backend works meets
/// TCP backpressure instead of growing the server's memory. A single request bigger than the byte bound is
/// admitted when nothing else is in flight, so every legal request can make progress.
/// </summary>
internal sealed class FlowBudget : IValueTaskSource
{
    private readonly int _maxRequests;
    private readonly long _maxBytes;
    private readonly Lock _lock = new();
    private ManualResetValueTaskSourceCore<bool> _waiter;
    private bool _waiting;
    private int _requests;
    private long _bytes;

    public FlowBudget(int maxRequests, long maxBytes)
    {
        _maxRequests = maxRequests;
        _maxBytes = maxBytes;
        _waiter.RunContinuationsAsynchronously = true;
    }

    public int Requests => Volatile.Read(ref _requests);

    /// <summary>Takes room for one request of <paramref name="bytes"/> payload bytes, waiting for it if needed.</summary>
    /// <remarks>Only the connection's reader calls this, so there is at most one waiter.</remarks>
    public ValueTask AcquireAsync(long bytes, CancellationToken cancellationToken)
    {
        lock (_lock)
        {
            if (TryTake(bytes))
            {
                return ValueTask.CompletedTask;
            }
        }

        return AcquireSlowAsync(bytes, cancellationToken);
    }

    public void Release(long bytes)
    {
        lock (_lock)
        {
            _requests--;
            _bytes -= bytes;
            if (_waiting)
            {
                _waiting = false;
                _waiter.SetResult(true);
            }
        }
    }

    /// <summary>Waits until no request is in flight.</summary>
    public async ValueTask WaitForIdleAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            ValueTask wait;
            lock (_lock)
            {
                if (_requests == 0)
                {
                    return;
                }

                wait = Arm();
            }

            await WaitCancellableAsync(wait, cancellationToken).ConfigureAwait(false);
        }
    }

    private async ValueTask AcquireSlowAsync(long bytes, CancellationToken cancellationToken)
    {
        while (true)
        {
            ValueTask wait;
            lock (_lock)
            {
                if (TryTake(bytes))
                {
                    return;
                }

                wait = Arm();
            }

            await WaitCancellableAsync(wait, cancellationToken).ConfigureAwait(false);
        }
    }

    private bool TryTake(long bytes)
    {
        if (_requests >= _maxRequests || (_requests > 0 && _bytes + bytes > _maxBytes))
        {
            return false;
        }

        _requests++;
        _bytes += bytes;
        return true;
    }

    private ValueTask Arm()
    {
        _waiter.Reset();
        _waiting = true;
        return new ValueTask(this, _waiter.Version);
    }

    private async ValueTask WaitCancellableAsync(ValueTask wait, CancellationToken cancellationToken)
    {
        if (!cancellationToken.CanBeCanceled)
        {
            await wait.ConfigureAwait(false);
            return;
        }

        await using var registration = cancellationToken.UnsafeRegister(static state =>
        {
            var budget = (FlowBudget)state!;
            lock (budget._lock)
            {
                if (budget._waiting)
                {
                    budget._waiting = false;
                    budget._waiter.SetException(new OperationCanceledException());
                }
            }
        }, this).ConfigureAwait(false);
        await wait.ConfigureAwait(false);
    }

    void IValueTaskSource.GetResult(short token) => _waiter.GetResult(token);

    ValueTaskSourceStatus IValueTaskSource.GetStatus(short token) => _waiter.GetStatus(token);

    void IValueTaskSource.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _waiter.OnCompleted(continuation, state, token, flags);
}
