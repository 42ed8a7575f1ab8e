namespace Spindle.Storage.Qcow2;

/// <summary>
/// A bounded cache of metadata tables (L2 tables, refcount blocks) keyed by their offset in the image file, with
/// clock (second chance) eviction and a dirty bit per table for write-back. Not thread-safe: the image's metadata
/// lock guards it.
/// </summary>
/// <remarks>
/// A dirty table about to be evicted is handed to the write-back callback first, which must leave it clean on disk
/// (for an L2 table that means flushing the refcounts it depends on first: see qcow2.md "Crash safety").
/// </remarks>
internal sealed class TableCache<T>
    where T : class
{
    private readonly Dictionary<long, int> _index;
    private readonly long[] _offsets;
    private readonly T?[] _values;
    private readonly bool[] _dirty;
    private readonly bool[] _referenced;
    private readonly Action<long, T> _writeBack;
    private int _count;
    private int _hand;
    private int _dirtyCount;

    public TableCache(int capacity, Action<long, T> writeBack)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        _index = new Dictionary<long, int>(Math.Min(capacity, 1024));
        _offsets = new long[capacity];
        _values = new T?[capacity];
        _dirty = new bool[capacity];
        _referenced = new bool[capacity];
        _writeBack = writeBack;
    }

    public int Capacity => _offsets.Length;

    public bool AnyDirty => _dirtyCount > 0;

    public bool TryGet(long offset, out T value)
    {
        if (_index.TryGetValue(offset, out var slot))
        {
            _referenced[slot] = true;
            value = _values[slot]!;
            return true;
        }

        value = null!;
        return false;
    }

    /// <summary>Adds a table (evicting another when full). A new table not yet on disk is added dirty.</summary>
    public void Add(long offset, T value, bool dirty)
    {
        if (_index.ContainsKey(offset))
        {
            throw new InvalidOperationException($"table at {offset} is already cached");
        }

        int slot;
        if (_count < _offsets.Length)
        {
            slot = _count++;
        }
        else
        {
            slot = Evict();
        }

        _offsets[slot] = offset;
        _values[slot] = value;
        _referenced[slot] = true;
        _dirty[slot] = dirty;
        if (dirty)
        {
            _dirtyCount++;
        }

        _index[offset] = slot;
    }

    /// <summary>Marks a cached table dirty; false when it is not cached (the caller then adds it).</summary>
    public bool MarkDirty(long offset)
    {
        if (!_index.TryGetValue(offset, out var slot))
        {
            return false;
        }

        if (!_dirty[slot])
        {
            _dirty[slot] = true;
            _dirtyCount++;
        }

        return true;
    }

    /// <summary>Hands every dirty table to <paramref name="write"/> and marks it clean.</summary>
    public int WriteDirty(Action<long, T> write)
    {
        if (_dirtyCount == 0)
        {
            return 0;
        }

        var written = 0;
        for (var slot = 0; slot < _count; slot++)
        {
            if (_dirty[slot])
            {
                write(_offsets[slot], _values[slot]!);
                _dirty[slot] = false;
                _dirtyCount--;
                written++;
            }
        }

        return written;
    }

    /// <summary>Drops a table (its cluster was freed), dirty or not.</summary>
    public void Remove(long offset)
    {
        if (!_index.Remove(offset, out var slot))
        {
            return;
        }

        if (_dirty[slot])
        {
            _dirtyCount--;
        }

        var last = --_count;
        if (slot != last)
        {
            _offsets[slot] = _offsets[last];
            _values[slot] = _values[last];
            _dirty[slot] = _dirty[last];
            _referenced[slot] = _referenced[last];
            _index[_offsets[slot]] = slot;
        }

        _values[last] = null;
        _dirty[last] = false;
        if (_hand >= _count)
        {
            _hand = 0;
        }
    }

    /// <summary>Drops every table (after a failure left their state unknown); dirty ones are lost.</summary>
    public void Clear()
    {
        _index.Clear();
        Array.Clear(_values);
        Array.Clear(_dirty);
        _count = 0;
        _dirtyCount = 0;
        _hand = 0;
    }

    private int Evict()
    {
        // Two sweeps at most: the first clears every reference bit it passes.
        for (var step = 0; step < 2 * _offsets.Length; step++)
        {
            var slot = _hand;
            _hand = (_hand + 1) % _offsets.Length;
            if (_referenced[slot])
            {
                _referenced[slot] = false;
                continue;
            }

            return Release(slot);
        }

        return Release(_hand);
    }

    private int Release(int slot)
    {
        if (_dirty[slot])
        {
            // The callback may write every dirty table (a full metadata flush), this one included.
            _writeBack(_offsets[slot], _values[slot]!);
            if (_dirty[slot])
            {
                _dirty[slot] = false;
                _dirtyCount--;
            }
        }

        _index.Remove(_offsets[slot]);
        _values[slot] = null;
        return slot;
    }
}
