using System.Buffers;
using System.Runtime.InteropServices;
using System.Threading.Tasks.Sources;
using Spindle.Storage.Rbd.Native;

namespace Spindle.Storage.Rbd;

/// <summary>
/// One librbd asynchronous request seen from .NET: a reusable <see cref="IValueTaskSource"/> whose completion is
/// fired by librbd's callback. The buffer stays pinned from submission until librbd is done with it, and no
/// thread waits in between.
/// </summary>
/// <remarks>
/// The callback runs on a librbd thread, so continuations are sent to the thread pool: running the NBD reply path
/// on librbd's completion thread would stall every other completion behind it. The object is recycled by the
/// <see cref="RbdAioOperationPool"/> once its result has been consumed, which <see cref="ValueTask"/> guarantees
/// happens exactly once.
/// </remarks>
internal sealed unsafe class RbdAioOperation : IValueTaskSource
{
    private readonly RbdAioOperationPool _pool;
    private ManualResetValueTaskSourceCore<bool> _core;
    private GCHandle _self;
    private MemoryHandle _pin;
    private Memory<byte> _readBuffer;
    private long _result;

    public RbdAioOperation(RbdAioOperationPool pool)
    {
        _pool = pool;
        _core.RunContinuationsAsynchronously = true;
        _self = GCHandle.Alloc(this, GCHandleType.Normal);
    }

    /// <summary>What the request was, for error messages ("read", "write"...).</summary>
    public string Name { get; private set; } = string.Empty;

    public long Offset { get; private set; }

    /// <summary>Called for a failed request, after the operation has been recycled: maps the errno to an exception.</summary>
    public Func<string, long, int, Exception>? FailureFactory { get; set; }

    /// <summary>Called when a request has finished (successfully or not), so the device can count what is in flight.</summary>
    public Action? Finished { get; set; }

    /// <summary>Prepares for a request and returns a new librbd completion that will fire <see cref="OnComplete"/>.</summary>
    /// <returns>0 or a negative errno from rbd_aio_create_completion.</returns>
    public int Begin(string name, long offset, out nint completion)
    {
        Name = name;
        Offset = offset;
        return LibRbd.AioCreateCompletion(GCHandle.ToIntPtr(_self), &OnComplete, out completion);
    }

    /// <summary>Pins <paramref name="buffer"/> until completion and returns its address.</summary>
    public byte* Pin(ReadOnlyMemory<byte> buffer)
    {
        _pin = buffer.Pin();
        return (byte*)_pin.Pointer;
    }

    /// <summary>Pins a read buffer; a short read (the image shrank under us) leaves the rest zeroed.</summary>
    public byte* PinForRead(Memory<byte> buffer)
    {
        _readBuffer = buffer;
        return Pin(buffer);
    }

    /// <summary>A request that librbd refused at submission: its completion will never fire.</summary>
    public void Abandon(nint completion)
    {
        LibRbd.AioRelease(completion);
        _pin.Dispose();
        _pin = default;
        _readBuffer = default;
        _pool.Return(this);
    }

    public ValueTask AsValueTask() => new(this, _core.Version);

    public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

    public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);

    public void GetResult(short token)
    {
        _core.GetResult(token);
        var result = _result;
        var name = Name;
        var offset = Offset;
        var failureFactory = FailureFactory;
        _core.Reset();
        _pool.Return(this);
        if (result < 0)
        {
            throw failureFactory!(name, offset, (int)-result);
        }
    }

    /// <summary>Releases the handle that lets librbd's callback find this object. Only for an idle operation.</summary>
    public void Free()
    {
        if (_self.IsAllocated)
        {
            _self.Free();
        }
    }

    private void Complete(long result)
    {
        _pin.Dispose();
        _pin = default;
        if (result >= 0 && result < _readBuffer.Length)
        {
            // librbd clips a read that runs past the end of the image (it shrank after we opened it): past the
            // end reads as zeroes, as for a file.
            _readBuffer.Span[(int)result..].Clear();
        }

        _readBuffer = default;
        _result = result;
        Finished?.Invoke();
        _core.SetResult(true);
    }

    [UnmanagedCallersOnly]
    private static void OnComplete(nint completion, nint argument)
    {
        try
        {
            var operation = (RbdAioOperation)GCHandle.FromIntPtr(argument).Target!;
            long result = LibRbd.AioGetReturnValue(completion);
            LibRbd.AioRelease(completion);
            operation.Complete(result);
        }
        catch (Exception exception)
        {
            // An exception cannot cross back into librbd, and swallowing it would leave a request unanswered
            // forever with its buffer pinned. This is a bug, so stop loudly.
            Environment.FailFast("librbd completion handling failed", exception);
        }
    }
}

/// <summary>Recycled <see cref="RbdAioOperation"/>s, so a request allocates nothing.</summary>
internal sealed class RbdAioOperationPool
{
    private const int MaxPooled = 1024;

    private readonly Stack<RbdAioOperation> _free = new();
    private readonly Lock _lock = new();
    private readonly Func<string, long, int, Exception> _failureFactory;
    private readonly Action _finished;
    private bool _closed;

    public RbdAioOperationPool(Func<string, long, int, Exception> failureFactory, Action finished)
    {
        _failureFactory = failureFactory;
        _finished = finished;
    }

    public RbdAioOperation Rent()
    {
        lock (_lock)
        {
            if (_free.TryPop(out var operation))
            {
                return operation;
            }
        }

        return new RbdAioOperation(this) { FailureFactory = _failureFactory, Finished = _finished };
    }

    public void Return(RbdAioOperation operation)
    {
        lock (_lock)
        {
            if (!_closed && _free.Count < MaxPooled)
            {
                _free.Push(operation);
                return;
            }
        }

        operation.Free();
    }

    /// <summary>Frees every pooled operation; operations returned later are freed at once.</summary>
    public void Close()
    {
        lock (_lock)
        {
            _closed = true;
            while (_free.TryPop(out var operation))
            {
                operation.Free();
            }
        }
    }
}
