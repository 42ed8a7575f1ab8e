using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Server.Tests;

/// <summary>
/// A memory device whose reads wait at a gate until the test opens it, and which counts what it is asked to do:
/// enough to observe parallelism, out-of-order replies, backpressure and flushes from outside.
/// </summary>
internal sealed class GatedBlockDevice : BlockDevice
{
    private readonly MemoryBlockDevice _inner;
    private TaskCompletionSource _gate = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _readsWaiting;
    private int _maxReadsWaiting;
    private int _flushes;

    public GatedBlockDevice(long size) => _inner = new MemoryBlockDevice(size);

    /// <summary>Only reads at offsets from here up wait at the gate.</summary>
    public long GatedFrom { get; set; }

    public override long Size => _inner.Size;

    public override BlockDeviceFeatures Features => _inner.Features;

    public int ReadsWaiting => Volatile.Read(ref _readsWaiting);

    public int MaxReadsWaiting => Volatile.Read(ref _maxReadsWaiting);

    public int Flushes => Volatile.Read(ref _flushes);

    public void Open() => _gate.TrySetResult();

    public void Close() => _gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);

    public async Task WaitForWaitingReadsAsync(int count, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (ReadsWaiting < count)
        {
            if (DateTime.UtcNow > deadline)
            {
                throw new TimeoutException($"{ReadsWaiting} reads waiting, expected {count}");
            }

            await Task.Delay(10);
        }
    }

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        offset >= GatedFrom ? GatedReadAsync(offset, destination, cancellationToken) : _inner.ReadAsync(offset, destination, cancellationToken);

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        _inner.WriteAsync(offset, source, fua, cancellationToken);

    public override ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _flushes);
        return ValueTask.CompletedTask;
    }

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        _inner.TrimAsync(offset, length, fua, cancellationToken);

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        _inner.WriteZeroesAsync(offset, length, flags, cancellationToken);

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        _inner.GetExtentsAsync(offset, length, extents, cancellationToken);

    private async ValueTask GatedReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var waiting = Interlocked.Increment(ref _readsWaiting);
        int observed;
        while ((observed = Volatile.Read(ref _maxReadsWaiting)) < waiting && Interlocked.CompareExchange(ref _maxReadsWaiting, waiting, observed) != observed)
        {
        }

        try
        {
            await _gate.Task.WaitAsync(TimeSpan.FromSeconds(30), cancellationToken);
        }
        finally
        {
            Interlocked.Decrement(ref _readsWaiting);
        }

        await _inner.ReadAsync(offset, destination, cancellationToken);
    }
}

/// <summary>A device whose every operation fails with a chosen error, to check error replies.</summary>
internal sealed class FailingBlockDevice(long size, NbdError error) : BlockDevice
{
    public override long Size => size;

    public override BlockDeviceFeatures Features =>
        BlockDeviceFeatures.Write | BlockDeviceFeatures.Flush | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
        BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.Extents;

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        throw new BlockDeviceException(error, $"injected {error} reading at {offset}");

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        throw new BlockDeviceException(error, $"injected {error} writing at {offset}");

    public override ValueTask FlushAsync(CancellationToken cancellationToken) =>
        ValueTask.FromException(new BlockDeviceException(error, "injected flush failure"));

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        throw new IOException("injected extents failure");
}

/// <summary>A memory device that zeroes only by writing, so FAST_ZERO must fail fast with ENOTSUP.</summary>
internal sealed class SlowZeroBlockDevice(long size) : BlockDevice
{
    private readonly MemoryBlockDevice _inner = new(size);

    public override long Size => size;

    public override BlockDeviceFeatures Features => _inner.Features;

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        _inner.ReadAsync(offset, destination, cancellationToken);

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        _inner.WriteAsync(offset, source, fua, cancellationToken);

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        (flags & ZeroFlags.FastOnly) != 0
            ? throw new BlockDeviceException(NbdError.NotSupported, "zeroing here is no faster than writing")
            : _inner.WriteAsync(offset, new byte[length], fua: false, cancellationToken);
}
