using System.Buffers.Binary;

namespace Spindle.Storage.Qcow2;

public sealed partial class Qcow2Image
{
    /// <summary>Above this many queued decrements a TRIM or WRITE_ZEROES flushes, so freed space is reused.</summary>
    private const int PendingFreeLimit = 4096;

    public override ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        FlushCore();
        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// Makes every completed write durable, data and metadata: dirty bitmaps are stored, metadata is written back in
    /// dependency order with fdatasync between the stages, and then the refcount decrements whose pointers are now
    /// gone on disk are applied (once no request still in flight can write to the freed clusters).
    /// </summary>
    private void FlushCore()
    {
        if (_readOnly)
        {
            return;
        }

        List<(long Offset, long Length)>? frees = null;
        var clean = false;
        lock (_meta)
        {
            EnsureWritable();
            StoreBitmapsLocked();
            if (_pendingFrees.Count > 0)
            {
                frees = _pendingFrees;
                _pendingFrees = [];
            }

            clean = frees is null && !MetadataDirtyLocked;
            if (!clean)
            {
                FlushMetadataLocked();
            }
        }

        if (clean)
        {
            // Every completed write's metadata is already written: only the data needs the sync, and it runs outside
            // the lock so that lookups (and other requests) go on meanwhile.
            _file.Sync();
            return;
        }

        if (frees is null)
        {
            return;
        }

        _gate.Drain();
        try
        {
            lock (_meta)
            {
                ApplyFreesLocked(frees);
            }
        }
        finally
        {
            _gate.Release();
        }
    }

    private bool MetadataDirtyLocked =>
        _refblocks.AnyDirty || _dirtyReftable.Count > 0 || _l2Cache.AnyDirty || BitmapTablesDirty || _dirtyL1.Count > 0;

    private void MaybeApplyFrees()
    {
        if (Volatile.Read(ref _pendingFrees).Count > PendingFreeLimit)
        {
            FlushCore();
        }
    }

    /// <summary>
    /// Writes dirty metadata back so that the file is consistent after every step (qcow2.md "Crash safety"):
    /// <list type="number">
    /// <item>refcount blocks (increments: a refcount above the references is only a leak);</item>
    /// <item>sync, then refcount table entries of new blocks (blocks on disk before they are linked);</item>
    /// <item>sync, then L2 tables and bitmap tables (clusters they point at are counted and written);</item>
    /// <item>sync, then L1 entries (new L2 tables on disk before they are linked);</item>
    /// <item>sync.</item>
    /// </list>
    /// Decrements are not part of this: they are queued and applied after it.
    /// </summary>
    private void FlushMetadataLocked()
    {
        _refblocks.WriteDirty((offset, block) => _file.Write(block, offset));
        if (_dirtyReftable.Count > 0)
        {
            _file.Sync();
            Span<byte> entry = stackalloc byte[8];
            foreach (var index in _dirtyReftable)
            {
                BinaryPrimitives.WriteUInt64BigEndian(entry, _reftable[index]);
                _file.Write(entry, _reftableOffset + (index * 8L));
            }

            _dirtyReftable.Clear();
        }

        if (_l2Cache.AnyDirty || BitmapTablesDirty)
        {
            _file.Sync();
            _l2Cache.WriteDirty(WriteTable);
            WriteBitmapTablesLocked();
        }

        if (_dirtyL1.Count > 0)
        {
            _file.Sync();
            Span<byte> entry = stackalloc byte[8];
            foreach (var index in _dirtyL1)
            {
                BinaryPrimitives.WriteUInt64BigEndian(entry, _l1[index]);
                _file.Write(entry, _l1Offset + (index * 8L));
            }

            _dirtyL1.Clear();
        }

        _file.Sync();
    }

    /// <summary>A dirty L2 table leaving the cache: everything it depends on is flushed first, and it with them.</summary>
    private void EvictL2(long offset, ulong[] table) => FlushMetadataLocked();
}
