namespace Spindle.Storage.Qcow2;

/// <summary>
/// Counts data I/O in flight outside the metadata lock, so that freed clusters are only handed out again once no
/// request that looked them up before they were freed can still write to them.
/// </summary>
/// <remarks>
/// Requests <see cref="Enter"/> before they look up a mapping and <see cref="Exit"/> after their I/O. Applying
/// refcount decrements <see cref="Drain"/>s the gate first (waiting for everything in flight, holding new requests
/// back), then <see cref="Release"/>s it. Draining is rare (a FLUSH after a TRIM or a copy-on-write), entering is two
/// interlocked operations. A thread must not drain while it is inside the gate or holds the metadata lock.
/// </remarks>
internal sealed class InFlightGate
{
    private readonly object _sync = new();
    private int _active;
    private volatile bool _draining;

    public void Enter()
    {
        while (true)
        {
            Interlocked.Increment(ref _active);
            if (!_draining)
            {
                return;
            }

            Exit();
            lock (_sync)
            {
                while (_draining)
                {
                    Monitor.Wait(_sync);
                }
            }
        }
    }

    public void Exit()
    {
        if (Interlocked.Decrement(ref _active) == 0 && _draining)
        {
            lock (_sync)
            {
                Monitor.PulseAll(_sync);
            }
        }
    }

    public void Drain()
    {
        lock (_sync)
        {
            while (_draining)
            {
                Monitor.Wait(_sync);
            }

            _draining = true;
            while (Volatile.Read(ref _active) != 0)
            {
                Monitor.Wait(_sync, 10);
            }
        }
    }

    public void Release()
    {
        lock (_sync)
        {
            _draining = false;
            Monitor.PulseAll(_sync);
        }
    }
}
