namespace Spindle.Server.Buffers;

/// <summary>
/// Pooled byte arrays in power-of-two size classes from 4 KiB to 32 MiB, allocated on the pinned object heap so
/// sockets can use them without pinning. Each class keeps at most a bounded number of arrays (about 16 MiB per
/// class), so retained memory is capped; anything beyond is left to the GC.
/// </summary>
public sealed class BufferPool
{
    public const int MinimumSize = 4096;
    public const int MaximumSize = 32 * 1024 * 1024;

    private const int MinimumShift = 12;
    private const int RetainedBytesPerClass = 16 * 1024 * 1024;

    private readonly SizeClass[] _classes;

    public BufferPool()
    {
        var count = 25 - MinimumShift + 1;
        _classes = new SizeClass[count];
        for (var i = 0; i < count; i++)
        {
            var size = 1 << (MinimumShift + i);
            _classes[i] = new SizeClass(size, Math.Max(1, RetainedBytesPerClass / size));
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

        public byte[] Rent()
        {
            lock (_lock)
            {
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
