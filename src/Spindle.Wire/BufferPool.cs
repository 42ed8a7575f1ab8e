namespace Spindle.Wire;

/// <summary>
/// Pooled byte arrays in power-of-two size classes from 4 KiB to 32 MiB, allocated on the pinned object heap so
/// sockets can use them without pinning. Each class keeps at most 32 MiB of arrays (one connection's in-flight
/// budget), so steady traffic never allocates and retained memory is capped; and a class nobody has used for
/// <see cref="IdleTrimAfter"/> gives its arrays back, so a burst of 1 MiB requests does not leave its buffers
/// resident for the rest of the server's life.
/// </summary>
public sealed class BufferPool
{
    public const int MinimumSize = 4096;
    public const int MaximumSize = 32 * 1024 * 1024;

    /// <summary>How long a size class may go unused before its retained arrays are released.</summary>
    public static readonly TimeSpan IdleTrimAfter = TimeSpan.FromSeconds(3);

    private const int MinimumShift = 12;
    // A connection may hold 32 MiB in flight; keeping that much per class means steady traffic never allocates,
    // and the idle trim gives it back once the traffic stops.
    private const int RetainedBytesPerClass = 32 * 1024 * 1024;

    private readonly SizeClass[] _classes;
    private readonly Timer _trim;

    public BufferPool()
    {
        var count = 25 - MinimumShift + 1;
        _classes = new SizeClass[count];
        for (var i = 0; i < count; i++)
        {
            var size = 1 << (MinimumShift + i);
            _classes[i] = new SizeClass(size, Math.Max(1, RetainedBytesPerClass / size));
        }

        _trim = new Timer(static state => ((BufferPool)state!).Trim(), this, IdleTrimAfter, IdleTrimAfter);
    }

    /// <summary>Arrays currently retained (not rented), in bytes.</summary>
    public long RetainedBytes => _classes.Sum(c => c.RetainedBytes);

    /// <summary>Releases the retained arrays of every class unused since the last trim.</summary>
    public void Trim()
    {
        var released = 0L;
        var now = Environment.TickCount64;
        foreach (var sizeClass in _classes)
        {
            released += sizeClass.TrimIfIdle(now, (long)IdleTrimAfter.TotalMilliseconds);
        }

        // Pinned arrays go back to the OS only after a collection; when a lot was let go, ask for one (without
        // blocking anything: the server is idle in that class by definition).
        if (released >= 8 * 1024 * 1024)
        {
            GC.Collect(2, GCCollectionMode.Optimized, blocking: false);
        }
    }

    /// <summary>A process-wide pool shared by every connection.</summary>
    public static BufferPool Shared { get; } = new();

    /// <summary>Rents an array of at least <paramref name="minimumLength"/> bytes (contents undefined).</summary>
    public byte[] Rent(int minimumLength)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(minimumLength);
        if (minimumLength > MaximumSize)
        {
            return GC.AllocateUninitializedArray<byte>(minimumLength, pinned: true);
        }

        return _classes[ClassIndex(minimumLength)].Rent();
    }

    /// <summary>Returns an array obtained from <see cref="Rent"/>. Arrays of other sizes are ignored.</summary>
    public void Return(byte[] array)
    {
        ArgumentNullException.ThrowIfNull(array);
        var length = array.Length;
        if (length < MinimumSize || length > MaximumSize || !int.IsPow2(length))
        {
            return;
        }

        _classes[ClassIndex(length)].Return(array);
    }

    private static int ClassIndex(int length) =>
        length <= MinimumSize ? 0 : (32 - int.LeadingZeroCount(length - 1)) - MinimumShift;

    private sealed class SizeClass(int size, int capacity)
    {
        private readonly byte[]?[] _items = new byte[]?[capacity];
        private readonly Lock _lock = new();
        private int _count;
        private long _lastUsed = Environment.TickCount64;

        public long RetainedBytes => (long)Volatile.Read(ref _count) * size;

        public long TrimIfIdle(long now, long idleMilliseconds)
        {
            lock (_lock)
            {
                if (_count == 0 || now - _lastUsed < idleMilliseconds)
                {
                    return 0;
                }

                var released = (long)_count * size;
                Array.Clear(_items, 0, _count);
                _count = 0;
                return released;
            }
        }

        public byte[] Rent()
        {
            lock (_lock)
            {
                _lastUsed = Environment.TickCount64;
                if (_count > 0)
                {
                    var item = _items[--_count]!;
                    _items[_count] = null;
                    return item;
                }
            }

            return GC.AllocateUninitializedArray<byte>(size, pinned: true);
        }

        public void Return(byte[] array)
        {
            lock (_lock)
            {
                if (_count < _items.Length)
                {
                    _items[_count++] = array;
                }
            }
        }
    }
}
