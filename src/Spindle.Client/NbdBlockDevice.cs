using System.Buffers;
using System.Runtime.CompilerServices;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Client;

/// <summary>
/// An NBD export as a <see cref="BlockDevice"/>, so everything that takes a block device (the FUSE device layer behind
/// <c>spindle mount</c> and <c>spindle attach</c>) can use a remote disk. Size and features come from the negotiated
/// export; every call goes through an <see cref="NbdClient"/>, which keeps requests waiting while it reconnects and
/// sends them again, so a server restart is a stall here, not an error.
/// </summary>
/// <remarks>
/// <para>Any byte offset and length are accepted. Requests are split at the export's maximum payload; for an export
/// with a minimum block size above one byte, unaligned reads read the covering blocks, unaligned writes read, patch
/// and write the partial blocks at their edges (serialised per block, so two writers of different bytes of one
/// block do not undo each other), TRIM and CACHE keep to the aligned part (both are hints), and unaligned
/// WRITE_ZEROES write zero bytes at the edges.</para>
/// <para>Failures are <see cref="BlockDeviceException"/>s with the NBD error (the server's, or EIO when the client
/// gave up on the connection after its dead-connection timeout), which the FUSE layer turns into errno.</para>
/// </remarks>
public sealed class NbdBlockDevice : BlockDevice
{
    private const int StripeCount = 64;

    private readonly bool _readOnly;
    private readonly BlockDeviceFeatures _features;
    private readonly long _minimum;
    private readonly int _maximumPayload;
    private readonly SemaphoreSlim[] _stripes;

    /// <summary>Wraps a connected client; disposing the device disposes the client.</summary>
    public NbdBlockDevice(NbdClient client, bool readOnly = false)
    {
        ArgumentNullException.ThrowIfNull(client);
        Client = client;
        var export = client.Export;
        _readOnly = readOnly || export.IsReadOnly;
        _minimum = export.MinimumBlockSize;
        _maximumPayload = export.MaximumPayload;
        _stripes = _minimum > 1 ? [.. Enumerable.Range(0, StripeCount).Select(_ => new SemaphoreSlim(1, 1))] : [];
        var features = BlockDeviceFeatures.None;
        if (!_readOnly)
        {
            features |= BlockDeviceFeatures.Write;
            features |= export.CanFua ? BlockDeviceFeatures.Fua : 0;
            features |= export.CanTrim ? BlockDeviceFeatures.Trim : 0;
            features |= export.CanWriteZeroes ? BlockDeviceFeatures.WriteZeroes : 0;
            features |= export.CanFastZero ? BlockDeviceFeatures.FastZero : 0;
        }

        features |= export.CanFlush ? BlockDeviceFeatures.Flush : 0;
        features |= export.CanCache ? BlockDeviceFeatures.Cache : 0;
        features |= export.CanBlockStatus ? BlockDeviceFeatures.Extents : 0;
        features |= export.CanMultiConn ? BlockDeviceFeatures.SharedCache : 0;
        features |= export.IsRotational ? BlockDeviceFeatures.Rotational : 0;
        _features = features;
    }

    /// <summary>The client every request goes through (its paths, its reconnection counters).</summary>
    public NbdClient Client { get; }

    /// <summary>The export's stable names, when the client discovered them (<see cref="NbdClientOptions.DiscoverIdentity"/>).</summary>
    public ExportIdentity? Identity => Client.Export.Identity;

    public override long Size => Client.Size;

    public override BlockDeviceFeatures Features => _features;

    /// <summary>Minimum 1 (this adapter handles alignment), the export's preferred and maximum sizes.</summary>
    public override BlockSizeConstraints? BlockSizes => new(1, Client.Export.PreferredBlockSize, (uint)_maximumPayload);

    public override string Description =>
        $"NBD export '{Client.Export.Name}' at {string.Join(", ", Client.Paths.Select(path => path.Target))}";

    /// <summary>Connects to an export through one or more paths (see <see cref="NbdClient.ConnectAsync(IReadOnlyList{NbdUri}, NbdClientOptions?, CancellationToken)"/>).</summary>
    public static async Task<NbdBlockDevice> ConnectAsync(IReadOnlyList<NbdUri> paths, NbdClientOptions? options = null, bool readOnly = false, CancellationToken cancellationToken = default)
    {
        var client = await NbdClient.ConnectAsync(paths, options, cancellationToken).ConfigureAwait(false);
        return new NbdBlockDevice(client, readOnly);
    }

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        if (destination.IsEmpty)
        {
            return ValueTask.CompletedTask;
        }

        if (!IsAligned(offset, destination.Length))
        {
            return Guard(ReadUnalignedAsync(offset, destination, cancellationToken));
        }

        return destination.Length <= _maximumPayload
            ? Guard(Client.ReadAsync(offset, destination, cancellationToken))
            : Guard(ReadSplitAsync(offset, destination, cancellationToken));
    }

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        if (_readOnly)
        {
            return ValueTask.FromException(new BlockDeviceException(NbdError.NotPermitted, $"{Description} is read-only"));
        }

        if (source.IsEmpty)
        {
            return ValueTask.CompletedTask;
        }

        var flags = fua && Client.Export.CanFua ? CommandFlags.Fua : CommandFlags.None;
        if (!IsAligned(offset, source.Length))
        {
            return Guard(WriteUnalignedAsync(offset, source, flags, cancellationToken));
        }

        return source.Length <= _maximumPayload
            ? Guard(Client.WriteAsync(offset, source, flags, cancellationToken))
            : Guard(WriteSplitAsync(offset, source, flags, cancellationToken));
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken) =>
        Client.Export.CanFlush ? Guard(Client.FlushAsync(cancellationToken)) : ValueTask.CompletedTask;

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        var (start, end) = Interior(offset, length);
        return end <= start
            ? ValueTask.CompletedTask
            : Guard(Client.TrimAsync(start, end - start, fua && Client.Export.CanFua ? CommandFlags.Fua : CommandFlags.None, cancellationToken));
    }

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        var command = CommandFlags.None;
        command |= (flags & ZeroFlags.NoHole) != 0 ? CommandFlags.NoHole : 0;
        command |= (flags & ZeroFlags.FastOnly) != 0 ? CommandFlags.FastZero : 0;
        command |= (flags & ZeroFlags.Fua) != 0 && Client.Export.CanFua ? CommandFlags.Fua : 0;
        if (IsAligned(offset, length))
        {
            return Guard(Client.WriteZeroesAsync(offset, length, command, cancellationToken));
        }

        return Guard(ZeroUnalignedAsync(offset, length, command, cancellationToken));
    }

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var (start, end) = Interior(offset, length);
        return !Client.Export.CanCache || end <= start ? ValueTask.CompletedTask : Guard(Client.CacheAsync(start, end - start, cancellationToken));
    }

    public override async ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        if (!Client.Export.CanBlockStatus)
        {
            await base.GetExtentsAsync(offset, length, extents, cancellationToken).ConfigureAwait(false);
            return;
        }

        // BLOCK_STATUS must be aligned too: ask for the covering blocks and clip the answer to the range.
        var start = offset - (offset % _minimum);
        var end = Math.Min(Size, AlignUp(offset + length));
        BlockStatusResult answer;
        try
        {
            answer = await Client.GetBlockStatusAsync(start, end - start, Spindle.Protocol.MetaContexts.BaseAllocation, CommandFlags.None, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception exception) when (Translate(exception) is { } translated)
        {
            throw translated;
        }

        foreach (var extent in answer.Extents)
        {
            var from = Math.Max(extent.Offset, offset);
            var to = Math.Min(extent.End, offset + length);
            if (to > from && !extents.Add(to - from, (AllocationFlags)(extent.Flags & (uint)(AllocationFlags.Hole | AllocationFlags.Zero))))
            {
                break;
            }
        }
    }

    protected override async ValueTask DisposeAsyncCore()
    {
        await Client.DisposeAsync().ConfigureAwait(false);
        foreach (var stripe in _stripes)
        {
            stripe.Dispose();
        }
    }

    /// <summary>The client's exceptions as the storage layer's: the NBD error for the caller's errno.</summary>
    private Exception? Translate(Exception exception) => exception switch
    {
        NbdServerErrorException server => new BlockDeviceException(server.Error.Normalize(), server.Message, server),
        NbdException nbd => new BlockDeviceException(NbdError.IO, $"{Description}: {nbd.Message}", nbd),
        TimeoutException timeout => new BlockDeviceException(NbdError.IO, $"{Description}: {timeout.Message}", timeout),
        NotSupportedException unsupported => new BlockDeviceException(NbdError.NotSupported, unsupported.Message, unsupported),
        ArgumentException argument => new BlockDeviceException(NbdError.InvalidArgument, argument.Message, argument),
        ObjectDisposedException disposed => new BlockDeviceException(NbdError.Shutdown, disposed.Message, disposed),
        _ => null,
    };

    private ValueTask Guard(ValueTask operation) => operation.IsCompletedSuccessfully ? ValueTask.CompletedTask : GuardAsync(operation);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask GuardAsync(ValueTask operation)
    {
        try
        {
            await operation.ConfigureAwait(false);
        }
        catch (Exception exception) when (Translate(exception) is { } translated)
        {
            throw translated;
        }
    }

    private bool IsAligned(long offset, long length) =>
        _minimum == 1 || (offset % _minimum == 0 && (length % _minimum == 0 || offset + length == Size));

    private long AlignUp(long value) => value % _minimum == 0 ? value : value + _minimum - (value % _minimum);

    /// <summary>The whole blocks inside a range (where TRIM, CACHE and WRITE_ZEROES may go as they are).</summary>
    private (long Start, long End) Interior(long offset, long length)
    {
        var end = offset + length;
        var alignedEnd = end == Size ? end : end - (end % _minimum);
        return (AlignUp(offset), alignedEnd);
    }

    private async ValueTask ReadSplitAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var parts = new List<Task>();
        for (var done = 0; done < destination.Length; done += _maximumPayload)
        {
            var count = Math.Min(_maximumPayload, destination.Length - done);
            parts.Add(Client.ReadAsync(offset + done, destination.Slice(done, count), cancellationToken).AsTask());
        }

        await Task.WhenAll(parts).ConfigureAwait(false);
    }

    private async ValueTask WriteSplitAsync(long offset, ReadOnlyMemory<byte> source, CommandFlags flags, CancellationToken cancellationToken)
    {
        var parts = new List<Task>();
        for (var done = 0; done < source.Length; done += _maximumPayload)
        {
            var count = Math.Min(_maximumPayload, source.Length - done);
            parts.Add(Client.WriteAsync(offset + done, source.Slice(done, count), flags, cancellationToken).AsTask());
        }

        await Task.WhenAll(parts).ConfigureAwait(false);
    }

    /// <summary>Reads the covering aligned range into a scratch buffer and copies the part asked for.</summary>
    private async ValueTask ReadUnalignedAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var start = offset - (offset % _minimum);
        var end = Math.Min(Size, AlignUp(offset + destination.Length));
        var scratch = ArrayPool<byte>.Shared.Rent((int)(end - start));
        try
        {
            await ReadAlignedAsync(start, scratch.AsMemory(0, (int)(end - start)), cancellationToken).ConfigureAwait(false);
            scratch.AsSpan((int)(offset - start), destination.Length).CopyTo(destination.Span);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(scratch);
        }
    }

    private ValueTask ReadAlignedAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        destination.Length <= _maximumPayload ? Client.ReadAsync(offset, destination, cancellationToken) : ReadSplitAsync(offset, destination, cancellationToken);

    /// <summary>
    /// Read-modify-write of the partial blocks at the edges (each under its stripe's lock), the aligned middle
    /// written as it is.
    /// </summary>
    private async ValueTask WriteUnalignedAsync(long offset, ReadOnlyMemory<byte> source, CommandFlags flags, CancellationToken cancellationToken)
    {
        var end = offset + source.Length;
        var headBlock = offset - (offset % _minimum);
        var tailBlock = end % _minimum == 0 || end == Size ? -1 : end - (end % _minimum);
        var headPartial = offset % _minimum != 0;
        var (interiorStart, interiorEnd) = Interior(offset, source.Length);
        var tasks = new List<Task>(3);
        if (headPartial)
        {
            var blockEnd = Math.Min(Size, headBlock + _minimum);
            var count = (int)(Math.Min(end, blockEnd) - offset);
            tasks.Add(PatchBlockAsync(headBlock, (int)(offset - headBlock), source[..count], flags, cancellationToken));
        }

        if (tailBlock >= 0 && (!headPartial || tailBlock != headBlock))
        {
            var skip = (int)(tailBlock - offset);
            tasks.Add(PatchBlockAsync(tailBlock, 0, source[skip..], flags, cancellationToken));
        }

        if (interiorEnd > interiorStart)
        {
            var middle = source.Slice((int)(interiorStart - offset), (int)(interiorEnd - interiorStart));
            tasks.Add(WriteAlignedAsync(interiorStart, middle, flags, cancellationToken).AsTask());
        }

        await Task.WhenAll(tasks).ConfigureAwait(false);
    }

    private ValueTask WriteAlignedAsync(long offset, ReadOnlyMemory<byte> source, CommandFlags flags, CancellationToken cancellationToken) =>
        source.Length <= _maximumPayload ? Client.WriteAsync(offset, source, flags, cancellationToken) : WriteSplitAsync(offset, source, flags, cancellationToken);

    /// <summary>Reads one block, puts <paramref name="bytes"/> at <paramref name="within"/>, writes it back, under the block's stripe lock.</summary>
    private async Task PatchBlockAsync(long block, int within, ReadOnlyMemory<byte> bytes, CommandFlags flags, CancellationToken cancellationToken)
    {
        var length = (int)Math.Min(_minimum, Size - block);
        var stripe = _stripes[(int)((block / _minimum) % StripeCount)];
        var scratch = ArrayPool<byte>.Shared.Rent(length);
        await stripe.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await Client.ReadAsync(block, scratch.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
            bytes.Span.CopyTo(scratch.AsSpan(within));
            await Client.WriteAsync(block, scratch.AsMemory(0, length), flags, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            stripe.Release();
            ArrayPool<byte>.Shared.Return(scratch);
        }
    }

    /// <summary>WRITE_ZEROES on the whole blocks, zero bytes written into the partial ones.</summary>
    private async ValueTask ZeroUnalignedAsync(long offset, long length, CommandFlags flags, CancellationToken cancellationToken)
    {
        var (start, end) = Interior(offset, length);
        var tasks = new List<Task>();
        if (end > start)
        {
            tasks.Add(Client.WriteZeroesAsync(start, end - start, flags, cancellationToken).AsTask());
        }

        var writeFlags = flags & CommandFlags.Fua;
        var headEnd = Math.Min(offset + length, end > start ? start : offset + length);
        if (headEnd > offset)
        {
            tasks.Add(WriteUnalignedAsync(offset, new byte[headEnd - offset], writeFlags, cancellationToken).AsTask());
        }

        if (end > start && offset + length > end)
        {
            tasks.Add(WriteUnalignedAsync(end, new byte[offset + length - end], writeFlags, cancellationToken).AsTask());
        }

        await Task.WhenAll(tasks).ConfigureAwait(false);
    }
}
