using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Storage.Layers;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests.Layers;

/// <summary>
/// The dirty bitmap layer against a model: every write, zero and trim marks exactly its granules, each bit is on the
/// store's stable copy before the request reaches the device below, concurrent first writes share one sync, and the
/// already-dirty path never syncs again.
/// </summary>
public sealed class DirtyBitmapTests
{
    private const long Granularity = 64 * 1024;
    private const int Size = (8 * 1024 * 1024) + 1000; // the last granule is short

    [Fact]
    public async Task Random_operations_mark_exactly_the_model_granules_durably_before_they_reach_the_device()
    {
        var store = new MemoryBitmapStore("model", Granularity, Size);
        var below = new MemoryBlockDevice(Size);
        var observer = new ObservingDevice(below, store);
        await using var device = new DirtyBitmapDevice(observer, [new DirtyBitmap(store)], ownsInner: true);
        var bitmap = device.Bitmaps[0];
        var bits = (int)((Size + Granularity - 1) / Granularity);
        var model = new bool[bits];
        var data = new byte[Size];
        var random = new Random(4321);
        for (var i = 0; i < 400; i++)
        {
            var offset = random.Next(Size);
            var length = random.Next(1, Math.Min(Size - offset, 300_000) + 1);
            var syncs = store.Syncs;
            var alreadyDirty = Enumerable.Range((int)(offset / Granularity), (int)(((offset + length - 1) / Granularity) - (offset / Granularity) + 1)).All(b => model[b]);
            switch (random.Next(4))
            {
                case 0:
                case 1:
                    var bytes = Patterns.Random(length, seed: i);
                    await device.WriteAsync(offset, bytes, fua: random.Next(2) == 0, CancellationToken.None);
                    bytes.CopyTo(data.AsSpan(offset));
                    break;
                case 2:
                    await device.TrimAsync(offset, length, fua: false, CancellationToken.None);
                    data.AsSpan(offset, length).Clear();
                    break;
                default:
                    await device.WriteZeroesAsync(offset, length, ZeroFlags.None, CancellationToken.None);
                    data.AsSpan(offset, length).Clear();
                    break;
            }

            for (var b = offset / Granularity; b <= (offset + length - 1) / Granularity; b++)
            {
                model[b] = true;
            }

            if (alreadyDirty)
            {
                Assert.Equal(syncs, store.Syncs); // the already-dirty path never pays
            }

            for (var b = 0; b < bits; b++)
            {
                Assert.Equal(model[b], bitmap.IsDirtyBit(b));
                Assert.Equal(model[b], store.IsDurable(b));
            }
        }

        Assert.Equal(0, observer.Violations);
        Assert.True(observer.Requests >= 400);
        var read = new byte[Size];
        await device.ReadAsync(0, read, CancellationToken.None);
        Assert.Equal(data, read);

        // The metadata context reports the model's runs, granule-aligned, with qemu's status words.
        var context = Assert.Single(device.MetaContexts, c => c.Name == "qemu:dirty-bitmap:model");
        var status = new ExtentList();
        await context.GetStatusAsync(0, Size, status, CancellationToken.None);
        long position = 0;
        for (var e = 0; e < status.Count; e++)
        {
            var extent = status[e];
            for (var p = position; p < position + extent.Length; p += 512)
            {
                Assert.Equal(model[p / Granularity] ? 1u : 0u, (uint)extent.Flags);
            }

            position += extent.Length;
        }

        Assert.Equal(Size, position);
        var dirtyGranules = model.Count(b => b);
        Assert.Equal((dirtyGranules * Granularity) - (model[^1] ? (bits * Granularity) - Size : 0), bitmap.DirtyBytes);
    }

    [Fact]
    public async Task Concurrent_first_writes_wait_for_one_shared_sync_and_none_completes_before_it()
    {
        using var entered = new SemaphoreSlim(0);
        using var release = new ManualResetEventSlim(false);
        var store = new MemoryBitmapStore("group", Granularity, Size)
        {
            BeforeSync = () =>
            {
                entered.Release();
                Assert.True(release.Wait(TimeSpan.FromSeconds(20)));
            },
        };
        var observer = new ObservingDevice(new MemoryBlockDevice(Size), store);
        await using var device = new DirtyBitmapDevice(observer, [new DirtyBitmap(store)], ownsInner: true);

        // 32 writes into one clean granule: the first starts a commit round, the others join it.
        var first = Enumerable.Range(0, 32).Select(i => Task.Run(() => device.WriteAsync(i * 1024, new byte[1024], fua: false, CancellationToken.None).AsTask())).ToArray();
        Assert.True(await entered.WaitAsync(TimeSpan.FromSeconds(20)));
        await Task.Delay(100); // give stragglers time to arrive: they must wait too

        // While that round is held, 16 writes to other clean granules: they need a second round.
        var second = Enumerable.Range(1, 16).Select(i => Task.Run(() => device.WriteAsync(i * Granularity, new byte[4096], fua: false, CancellationToken.None).AsTask())).ToArray();
        await Task.Delay(100);
        Assert.All(first.Concat(second), task => Assert.False(task.IsCompleted));
        Assert.Equal(0, observer.Requests);
        Assert.False(store.IsDurable(0));

        release.Set();
        await Task.WhenAll(first.Concat(second)).WaitAsync(TimeSpan.FromSeconds(20));
        Assert.Equal(0, observer.Violations);
        Assert.Equal(48, observer.Requests);
        Assert.Equal(2, store.Syncs); // one round for the 32, one shared by the 16
        for (var b = 0; b <= 16; b++)
        {
            Assert.True(store.IsDurable(b));
        }

        // Dirty now: the same granules pass straight through, with no sync at all.
        await Task.WhenAll(Enumerable.Range(0, 64).Select(i => device.WriteAsync(i * 4096, new byte[512], fua: false, CancellationToken.None).AsTask()));
        Assert.Equal(2, store.Syncs);
    }

    [Fact]
    public async Task A_failed_sync_fails_the_write_before_the_device_and_the_next_write_retries_it()
    {
        var fail = true;
        var store = new MemoryBitmapStore("retry", Granularity, Size)
        {
            BeforeSync = () =>
            {
                if (fail)
                {
                    throw new IOException("disk full (test)");
                }
            },
        };
        var observer = new ObservingDevice(new MemoryBlockDevice(Size), store);
        await using var device = new DirtyBitmapDevice(observer, [new DirtyBitmap(store)], ownsInner: true);
        var error = await Assert.ThrowsAsync<BlockDeviceException>(() => device.WriteAsync(Granularity * 3, new byte[100], fua: false, CancellationToken.None).AsTask());
        Assert.Equal(NbdError.IO, error.Error);
        Assert.Equal(0, observer.Requests);
        Assert.False(store.IsDurable(3));

        fail = false;
        await device.WriteAsync(Granularity * 3, new byte[100], fua: false, CancellationToken.None);
        Assert.True(store.IsDurable(3));
        Assert.Equal(1, observer.Requests);
        Assert.Equal(0, observer.Violations);
    }

    [Fact]
    public void A_bitmap_of_another_size_or_a_taken_name_is_refused()
    {
        var inner = new MemoryBlockDevice(Size);
        var other = Assert.Throws<InvalidDataException>(() => new DirtyBitmapDevice(inner, [new DirtyBitmap(new MemoryBitmapStore("a", Granularity, Size + 512))], ownsInner: false));
        Assert.Contains("describes", other.Message, StringComparison.Ordinal);

        var twice = Assert.Throws<InvalidDataException>(() => new DirtyBitmapDevice(inner, [new DirtyBitmap(new MemoryBitmapStore("a", Granularity, Size)), new DirtyBitmap(new MemoryBitmapStore("a", Granularity, Size))], ownsInner: false));
        Assert.Contains("qemu:dirty-bitmap:a", twice.Message, StringComparison.Ordinal);

        // A name the device below already offers (a qcow2 image's own bitmap) is refused the same way.
        var lower = new DirtyBitmapDevice(inner, [new DirtyBitmap(new MemoryBitmapStore("b", Granularity, Size))], ownsInner: false);
        var clash = Assert.Throws<InvalidDataException>(() => new DirtyBitmapDevice(lower, [new DirtyBitmap(new MemoryBitmapStore("b", Granularity, Size))], ownsInner: false));
        Assert.Contains("already offers qemu:dirty-bitmap:b", clash.Message, StringComparison.Ordinal);
    }

    /// <summary>
    /// Below the bitmap layer: counts the requests that arrive and those whose granules are not yet durable in the
    /// store (a crash then would lose an acknowledged change).
    /// </summary>
    private sealed class ObservingDevice(BlockDevice inner, MemoryBitmapStore store) : LayerDevice(inner, ownsInner: true)
    {
        private int _requests;
        private int _violations;

        public int Requests => Volatile.Read(ref _requests);

        public int Violations => Volatile.Read(ref _violations);

        public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
        {
            Check(offset, source.Length);
            return base.WriteAsync(offset, source, fua, cancellationToken);
        }

        public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
        {
            Check(offset, length);
            return base.TrimAsync(offset, length, fua, cancellationToken);
        }

        public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
        {
            Check(offset, length);
            return base.WriteZeroesAsync(offset, length, flags, cancellationToken);
        }

        private void Check(long offset, long length)
        {
            Interlocked.Increment(ref _requests);
            for (var bit = offset / store.Granularity; bit <= (offset + length - 1) / store.Granularity; bit++)
            {
                if (!store.IsDurable(bit))
                {
                    Interlocked.Increment(ref _violations);
                    return;
                }
            }
        }
    }
}
