using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Storage.Layers;

/// <summary>
/// One crash-safe dirty bitmap in memory (issue 14), persisted through a <see cref="DirtyBitmapStore"/>. It keeps two
/// copies of the bits: <c>set</c>, every bit some request asked for, and <c>durable</c>, the bits known to be on
/// stable storage. A request whose bits are all durable passes at once (<see cref="IsDurable"/>: a few word reads,
/// no lock, no allocation). Otherwise <see cref="MarkAsync"/> sets its bits, flags their pages and waits for a
/// commit round that covers them: one round at a time writes every flagged page and syncs the store once, so
/// requests arriving while a round runs share the next one (group commit). A request whose bits another request has
/// already set waits for the round that makes those bits durable, never less.
/// </summary>
public sealed class DirtyBitmap : IDisposable
{
    private const int WordsPerPage = DirtyBitmapStore.PageSize / sizeof(long);

    /// <summary>The largest body accepted: 1 GiB, 2^33 bits (a 512 TiB image at 64 KiB granularity).</summary>
    public const long MaxBodyBytes = 1L << 30;

    private readonly DirtyBitmapStore _store;
    private readonly int _shift;
    private readonly long _bitCount;
    private readonly long[] _set;
    private readonly long[] _durable;

    // Commit state, all under _gate. _pageRound[p] is the round number whose completion makes every bit set so far in
    // page p durable; _requested is the newest such number handed out, _durableRound the newest completed.
    private readonly Lock _gate = new();
    private readonly long[] _pageRound;
    private readonly bool[] _pageFlagged;
    private readonly List<long> _flagged = [];
    private long _requested;
    private long _durableRound;
    private long _inFlightRound;
    private TaskCompletionSource? _inFlight;
    private TaskCompletionSource? _next;
    private Task _committer = Task.CompletedTask;
    private bool _committing;
    private bool _disposed;

    /// <summary>Loads the bitmap from <paramref name="store"/>; the bitmap owns the store from here on.</summary>
    public DirtyBitmap(DirtyBitmapStore store)
    {
        ArgumentNullException.ThrowIfNull(store);
        if (!DirtyBitmapStore.IsValidGranularity(store.Granularity))
        {
            throw new InvalidDataException($"bitmap '{store.Name}': granularity {store.Granularity} is not a power of two from 512 bytes to 1 GiB");
        }

        if (store.PageCount * DirtyBitmapStore.PageSize > MaxBodyBytes)
        {
            throw new InvalidDataException($"bitmap '{store.Name}': {store.BitCount} bits is more than 1 GiB of bitmap; choose a larger granularity");
        }

        _store = store;
        _shift = System.Numerics.BitOperations.Log2((ulong)store.Granularity);
        _bitCount = store.BitCount;
        var pages = (int)store.PageCount;
        var body = new byte[pages * DirtyBitmapStore.PageSize];
        store.Load(body);
        _set = new long[pages * WordsPerPage];
        for (var i = 0; i < _set.Length; i++)
        {
            _set[i] = BinaryPrimitives.ReadInt64LittleEndian(body.AsSpan(i * sizeof(long)));
        }

        // Bits past the end describe nothing: drop them rather than report them.
        var tail = (int)(_bitCount & 63);
        var lastWord = _bitCount >> 6;
        if (lastWord < _set.Length)
        {
            _set[lastWord] &= tail == 0 ? 0 : (1L << tail) - 1;
            Array.Clear(_set, (int)lastWord + 1, _set.Length - (int)lastWord - 1);
        }

        _durable = (long[])_set.Clone();
        _pageRound = new long[pages];
        _pageFlagged = new bool[pages];
    }

    /// <summary>The bitmap's name (<c>qemu:dirty-bitmap:NAME</c>).</summary>
    public string Name => _store.Name;

    /// <summary>Bytes of the image one bit covers.</summary>
    public long Granularity => _store.Granularity;

    /// <summary>The size of the image the bitmap describes.</summary>
    public long ImageSize => _store.ImageSize;

    /// <summary>The store behind the bitmap.</summary>
    public DirtyBitmapStore Store => _store;

    /// <summary>Bytes of the image marked dirty (whole granules; the last one only up to the end of the image).</summary>
    public long DirtyBytes
    {
        get
        {
            long bits = 0;
            for (var i = 0; i < _set.Length; i++)
            {
                bits += System.Numerics.BitOperations.PopCount((ulong)Volatile.Read(ref _set[i]));
            }

            var dirty = bits << _shift;
            var tailBit = _bitCount - 1;
            if (_bitCount > 0 && IsDirtyBit(tailBit))
            {
                dirty -= ((tailBit + 1) << _shift) - ImageSize;
            }

            return dirty;
        }
    }

    /// <summary>Whether bit <paramref name="bit"/> is set (some request asked for it; acknowledged ones are durable too).</summary>
    public bool IsDirtyBit(long bit) =>
        bit < _bitCount && ((Volatile.Read(ref _set[bit >> 6]) >> (int)(bit & 63)) & 1) != 0;

    /// <summary>
    /// True when every bit covering [<paramref name="offset"/>, +<paramref name="length"/>) is already durable, so a
    /// request there needs nothing from the bitmap: the hot path of every write after the first to a region.
    /// </summary>
    public bool IsDurable(long offset, long length)
    {
        if (length <= 0)
        {
            return true;
        }

        var first = offset >> _shift;
        var last = Math.Min((offset + length - 1) >> _shift, _bitCount - 1);
        for (var word = first >> 6; word <= last >> 6; word++)
        {
            var mask = Mask(word, first, last);
            if ((Volatile.Read(ref _durable[word]) & mask) != mask)
            {
                return false;
            }
        }

        return true;
    }

    /// <summary>
    /// Sets the bits covering [<paramref name="offset"/>, +<paramref name="length"/>) and completes once they are on
    /// stable storage; fails with <see cref="NbdError.IO"/> (or the store's error) when they cannot be made so.
    /// </summary>
    public Task MarkAsync(long offset, long length, CancellationToken cancellationToken)
    {
        if (length <= 0 || offset >= ImageSize)
        {
            return Task.CompletedTask;
        }

        var first = offset >> _shift;
        var last = Math.Min((offset + length - 1) >> _shift, _bitCount - 1);
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var needed = 0L;
            var round = _requested + 1;
            var added = false;
            for (var word = first >> 6; word <= last >> 6; word++)
            {
                var page = word / WordsPerPage;
                var mask = Mask(word, first, last);
                var old = _set[word];
                if ((old & mask) != mask)
                {
                    Volatile.Write(ref _set[word], old | mask);
                    added = true;
                    _pageRound[page] = round;
                    if (!_pageFlagged[page])
                    {
                        _pageFlagged[page] = true;
                        _flagged.Add(page);
                    }
                }

                needed = Math.Max(needed, _pageRound[page]);
            }

            if (added)
            {
                _requested = round;
            }

            if (needed <= _durableRound)
            {
                return Task.CompletedTask;
            }

            if (_inFlight is not null && needed <= _inFlightRound)
            {
                return _inFlight.Task.WaitAsync(cancellationToken);
            }

            _next ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            var waiting = _next.Task;
            if (!_committing)
            {
                _committing = true;
                _committer = Task.Run(CommitRounds, CancellationToken.None);
            }

            return waiting.WaitAsync(cancellationToken);
        }
    }

    /// <summary>Runs commit rounds while requests wait for one; one round is one sync of the store.</summary>
    private void CommitRounds()
    {
        var page = new byte[DirtyBitmapStore.PageSize];
        var snapshot = new long[WordsPerPage];
        while (true)
        {
            TaskCompletionSource round;
            long number;
            long[] pages;
            lock (_gate)
            {
                if (_next is null)
                {
                    _committing = false;
                    return;
                }

                round = _next;
                _next = null;
                number = _requested;
                _inFlight = round;
                _inFlightRound = number;
                pages = [.. _flagged];
                _flagged.Clear();
                foreach (var p in pages)
                {
                    _pageFlagged[p] = false;
                }
            }

            try
            {
                // Each page is copied after the round's number was taken, so it holds every bit of every request
                // numbered up to it (they were set under the lock before); newer bits riding along are harmless.
                var copies = new long[pages.Length][];
                for (var i = 0; i < pages.Length; i++)
                {
                    var start = (int)(pages[i] * WordsPerPage);
                    for (var w = 0; w < WordsPerPage; w++)
                    {
                        snapshot[w] = Volatile.Read(ref _set[start + w]);
                        BinaryPrimitives.WriteInt64LittleEndian(page.AsSpan(w * sizeof(long)), snapshot[w]);
                    }

                    copies[i] = (long[])snapshot.Clone();
                    _store.WritePage(pages[i], page);
                }

                _store.Sync();
                lock (_gate)
                {
                    for (var i = 0; i < pages.Length; i++)
                    {
                        var start = (int)(pages[i] * WordsPerPage);
                        for (var w = 0; w < WordsPerPage; w++)
                        {
                            Volatile.Write(ref _durable[start + w], _durable[start + w] | copies[i][w]);
                        }
                    }

                    _durableRound = number;
                    _inFlight = null;
                }

                round.SetResult();
            }
            catch (Exception exception)
            {
                lock (_gate)
                {
                    // The pages go round again with the next request that needs them.
                    foreach (var p in pages)
                    {
                        if (!_pageFlagged[p])
                        {
                            _pageFlagged[p] = true;
                            _flagged.Add(p);
                        }
                    }

                    _inFlight = null;
                }

                round.SetException(exception as BlockDeviceException ??
                    new BlockDeviceException(NbdError.IO, $"bitmap '{Name}' could not be made durable: {exception.Message}", exception));
            }
        }
    }

    /// <summary>The bits of word <paramref name="word"/> that lie within [<paramref name="first"/>, <paramref name="last"/>].</summary>
    private static long Mask(long word, long first, long last)
    {
        var low = Math.Max(first, word << 6) & 63;
        var high = Math.Min(last, (word << 6) + 63) & 63;
        var width = (int)(high - low + 1);
        return width == 64 ? -1L : ((1L << width) - 1) << (int)low;
    }

    public void Dispose()
    {
        Task committer;
        lock (_gate)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            committer = _committer;
        }

        try
        {
            committer.Wait(TimeSpan.FromSeconds(30));
        }
        catch (AggregateException)
        {
            // The round's failure reached its requests already.
        }

        _store.Dispose();
    }
}
