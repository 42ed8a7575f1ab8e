using Spindle.Protocol;

namespace Spindle.Storage;

/// <summary>One run of bytes sharing a status: allocation flags for base:allocation, or another context's word.</summary>
public readonly record struct Extent(long Length, AllocationFlags Flags)
{
    /// <summary>The status as the 32-bit word a metadata context other than base:allocation defines.</summary>
    public uint Status => (uint)Flags;
}

/// <summary>
/// Collects the extents a backend reports, merging neighbours with equal status (the spec asks for different
/// statuses between consecutive descriptors) and stopping at a capacity. Reusable: <see cref="Clear"/> keeps
/// the storage, so a pooled list allocates nothing per request.
/// </summary>
public sealed class ExtentList
{
    private Extent[] _items;

    public ExtentList(int capacity = 1024)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        MaxCount = capacity;
        _items = new Extent[Math.Min(capacity, 64)];
    }

    /// <summary>The most extents this list accepts; backends stop reporting once it is full.</summary>
    public int MaxCount { get; private set; }

    public int Count { get; private set; }

    /// <summary>The total length described so far.</summary>
    public long TotalLength { get; private set; }

    public bool IsFull => Count >= MaxCount;

    public ReadOnlySpan<Extent> Items => _items.AsSpan(0, Count);

    public Extent this[int index] => Items[index];

    /// <summary>Appends an extent with a metadata context's own status word (see <see cref="MetaContextSource"/>).</summary>
    /// <returns>False when the list is full and the extent was not recorded.</returns>
    public bool Add(long length, uint status) => Add(length, (AllocationFlags)status);

    /// <summary>Appends an extent, merging it into the previous one when the status is equal. Zero lengths are ignored.</summary>
    /// <returns>False when the list is full and the extent was not recorded.</returns>
    public bool Add(long length, AllocationFlags flags)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (length == 0)
        {
            return true;
        }

        if (Count > 0 && _items[Count - 1].Flags == flags)
        {
            _items[Count - 1] = new Extent(_items[Count - 1].Length + length, flags);
            TotalLength += length;
            return true;
        }

        if (IsFull)
        {
            return false;
        }

        if (Count == _items.Length)
        {
            Array.Resize(ref _items, Math.Min(_items.Length * 2, MaxCount));
        }

        _items[Count++] = new Extent(length, flags);
        TotalLength += length;
        return true;
    }

    /// <summary>Empties the list and sets a new capacity, keeping the storage.</summary>
    public void Clear(int maxCount)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxCount, 1);
        MaxCount = maxCount;
        Count = 0;
        TotalLength = 0;
    }
}
