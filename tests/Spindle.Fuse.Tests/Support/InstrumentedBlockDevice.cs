using System.Collections.Concurrent;
using Spindle.Storage;

namespace Spindle.Fuse.Tests.Support;

/// <summary>One call that reached the backend.</summary>
internal sealed record DeviceCall(string Operation, long Offset, long Length, bool Fua, ZeroFlags ZeroFlags);

/// <summary>
/// A real backend (memory or file) with instrumentation in front: records every call that reaches it, and can
/// hide features, inject failures at chosen offsets, and hold reads until released (asynchronously, or by
/// blocking the calling thread as a slow synchronous backend would).
/// </summary>
internal sealed class InstrumentedBlockDevice(BlockDevice inner) : BlockDevice
{
    private readonly ConcurrentQueue<DeviceCall> _calls = new();

    public BlockDevice Inner => inner;

    public override long Size => inner.Size;

    public BlockDeviceFeatures HiddenFeatures { get; set; }

    public override BlockDeviceFeatures Features => inner.Features & ~HiddenFeatures;

    public override string Description => "instrumented " + inner.Description;

    /// <summary>Returns the exception a call should fail with, or null: (operation, offset, length).</summary>
    public Func<string, long, long, Exception?>? Fault { get; set; }

    /// <summary>Reads starting in [HeldFrom, HeldTo) wait for <see cref="Release"/>.</summary>
    public long HeldFrom { get; set; } = -1;

    public long HeldTo { get; set; } = -1;

    /// <summary>Held reads block their thread instead of completing asynchronously later.</summary>
    public bool HoldByBlocking { get; set; }

    public ManualResetEventSlim Released { get; } = new(false);

    private readonly TaskCompletionSource _releasedAsync = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public int HeldReads => Volatile.Read(ref _heldReads);

    private int _heldReads;

    public IReadOnlyList<DeviceCall> Calls => _calls.ToArray();

    public int Count(string operation) => _calls.Count(call => call.Operation == operation);

    public void ClearCalls() => _calls.Clear();

    public void Release()
    {
        Released.Set();
        _releasedAsync.TrySetResult();
    }

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        Record("read", offset, destination.Length);
        if (offset >= HeldFrom && offset < HeldTo)
        {
            Interlocked.Increment(ref _heldReads);
            if (HoldByBlocking)
            {
                // A synchronous backend stuck in a system call: the calling thread is blocked (bounded for safety).
                Released.Wait(TimeSpan.FromSeconds(60), cancellationToken);
                return inner.ReadAsync(offset, destination, cancellationToken);
            }

            return HeldReadAsync(offset, destination, cancellationToken);
        }

        return inner.ReadAsync(offset, destination, cancellationToken);
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        Record("write", offset, source.Length, fua);
        return inner.WriteAsync(offset, source, fua, cancellationToken);
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        Record("flush", 0, 0);
        return inner.FlushAsync(cancellationToken);
    }

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        Record("trim", offset, length, fua);
        return inner.TrimAsync(offset, length, fua, cancellationToken);
    }

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        Record("zero", offset, length, zeroFlags: flags);
        return inner.WriteZeroesAsync(offset, length, flags, cancellationToken);
    }

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        inner.GetExtentsAsync(offset, length, extents, cancellationToken);

    private async ValueTask HeldReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        await _releasedAsync.Task.WaitAsync(TimeSpan.FromSeconds(60), cancellationToken).ConfigureAwait(false);
        await inner.ReadAsync(offset, destination, cancellationToken).ConfigureAwait(false);
    }

    private void Record(string operation, long offset, long length, bool fua = false, ZeroFlags zeroFlags = ZeroFlags.None)
    {
        _calls.Enqueue(new DeviceCall(operation, offset, length, fua, zeroFlags));
        if (Fault?.Invoke(operation, offset, length) is { } exception)
        {
            throw exception;
        }
    }
}
