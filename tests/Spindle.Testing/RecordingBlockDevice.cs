using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Testing;

public enum OperationKind
{
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
}

/// <summary>One call the server made on the backend, in the order the calls started.</summary>
public readonly record struct Operation(OperationKind Kind, long Offset, long Length, bool Fua, ZeroFlags ZeroFlags = ZeroFlags.None)
{
    public long End => Offset + Length;
}

/// <summary>
/// Passes every call through to another backend and records it, so a test sees on the server side exactly which
/// NBD commands the kernel sent: TRIM versus WRITE_ZEROES, FUA writes, FLUSH after the writes, request sizes.
/// Reads of <see cref="FailingReads"/> fail with EIO, as a bad sector would.
/// </summary>
public sealed class RecordingBlockDevice(BlockDevice inner) : BlockDevice
{
    private readonly List<Operation> _operations = [];
    private readonly Lock _lock = new();

    public override long Size => inner.Size;

    public override BlockDeviceFeatures Features => inner.Features;

    public override BlockSizeConstraints? BlockSizes => inner.BlockSizes;

    public override string Description => inner.Description;

    /// <summary>A byte range whose reads fail with EIO, or null.</summary>
    public (long Offset, long Length)? FailingReads { get; init; }

    public IReadOnlyList<Operation> Operations
    {
        get
        {
            lock (_lock)
            {
                return [.. _operations];
            }
        }
    }

    public IEnumerable<Operation> OfKind(OperationKind kind) => Operations.Where(o => o.Kind == kind);

    /// <summary>Whether the operations of <paramref name="kind"/> together cover [start, end).</summary>
    public bool Covers(OperationKind kind, long start, long end, Func<Operation, bool>? where = null)
    {
        var position = start;
        foreach (var operation in OfKind(kind).Where(o => where?.Invoke(o) ?? true).OrderBy(o => o.Offset))
        {
            if (operation.Offset > position)
            {
                break;
            }

            position = Math.Max(position, operation.End);
            if (position >= end)
            {
                return true;
            }
        }

        return position >= end;
    }

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        Record(new Operation(OperationKind.Read, offset, destination.Length, Fua: false));
        if (FailingReads is { } bad && offset < bad.Offset + bad.Length && bad.Offset < offset + destination.Length)
        {
            throw new BlockDeviceException(NbdError.IO, $"simulated bad sector at {bad.Offset}");
        }

        return inner.ReadAsync(offset, destination, cancellationToken);
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        Record(new Operation(OperationKind.Write, offset, source.Length, fua));
        return inner.WriteAsync(offset, source, fua, cancellationToken);
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        Record(new Operation(OperationKind.Flush, 0, 0, Fua: false));
        return inner.FlushAsync(cancellationToken);
    }

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        Record(new Operation(OperationKind.Trim, offset, length, fua));
        return inner.TrimAsync(offset, length, fua, cancellationToken);
    }

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        Record(new Operation(OperationKind.WriteZeroes, offset, length, (flags & ZeroFlags.Fua) != 0, flags));
        return inner.WriteZeroesAsync(offset, length, flags, cancellationToken);
    }

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken)
    {
        Record(new Operation(OperationKind.Cache, offset, length, Fua: false));
        return inner.CacheAsync(offset, length, cancellationToken);
    }

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        inner.GetExtentsAsync(offset, length, extents, cancellationToken);

    protected override ValueTask DisposeAsyncCore() => inner.DisposeAsync();

    private void Record(Operation operation)
    {
        lock (_lock)
        {
            _operations.Add(operation);
        }
    }
}
