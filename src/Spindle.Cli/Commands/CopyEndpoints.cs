using System.Runtime.CompilerServices;
using Spindle.Client;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>A run of the source: data to copy, or bytes known to read as zeroes.</summary>
internal readonly record struct SourceRun(long Offset, long Length, bool Zero);

/// <summary>One side of a copy: an NBD export, a regular file or a block device.</summary>
internal abstract class CopyEndpoint : IAsyncDisposable
{
    /// <summary>What the user named (a URI or a path), for messages.</summary>
    public abstract string Name { get; }

    /// <summary>"nbd", "file" or "block device".</summary>
    public abstract string Kind { get; }

    public abstract long Size { get; }

    /// <summary>Offsets and lengths sent here must be multiples of this (except a tail ending at <see cref="Size"/>).</summary>
    public virtual int MinimumBlockSize => 1;

    public virtual int PreferredBlockSize => 4096;

    /// <summary>The largest read or write in one request.</summary>
    public virtual int MaxRequestSize => 32 * 1024 * 1024;

    /// <summary>Connections this endpoint uses (NBD); null when it has no such limit (local files).</summary>
    public virtual int? Connections => null;

    /// <summary>True when the destination already reads as zeroes everywhere (a file just created or truncated).</summary>
    public bool IsZero { get; set; }

    /// <summary>True when zeroing a range is cheap here (WRITE_ZEROES, fallocate), so zero runs need not be written as data.</summary>
    public virtual bool CanZero => false;

    public abstract ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken);

    public abstract ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken);

    /// <summary>Makes the range read as zeroes without sending data; false if that is not possible here.</summary>
    public virtual ValueTask<bool> TryZeroAsync(long offset, long length, bool allocate, CancellationToken cancellationToken) => ValueTask.FromResult(false);

    /// <summary>The allocation of [offset, +length): data runs and runs known to read as zeroes, in order.</summary>
    public virtual async IAsyncEnumerable<SourceRun> GetRunsAsync(long offset, long length, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        await Task.CompletedTask.ConfigureAwait(false);
        yield return new SourceRun(offset, length, false);
    }

    /// <summary>True if <see cref="GetRunsAsync"/> reports real allocation (not just "all data").</summary>
    public virtual bool HasExtents => false;

    public abstract ValueTask FlushAsync(CancellationToken cancellationToken);

    public abstract ValueTask DisposeAsync();
}

/// <summary>An NBD export through <see cref="NbdClient"/>.</summary>
internal sealed class NbdCopyEndpoint(NbdClient client, string name) : CopyEndpoint
{
    public NbdClient Client { get; } = client;

    public override string Name { get; } = name;

    public override string Kind => "nbd";

    public override long Size => Client.Size;

    public override int MinimumBlockSize => (int)Client.Export.MinimumBlockSize;

    public override int PreferredBlockSize => (int)Math.Min(Client.Export.PreferredBlockSize, 32u * 1024 * 1024);

    public override int MaxRequestSize => Client.Export.MaximumPayload;

    public override int? Connections => Client.ConnectionCount;

    public override bool CanZero => Client.Export.CanWriteZeroes;

    public override bool HasExtents => Client.Export.CanBlockStatus;

    public override ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
        Client.ReadAsync(offset, buffer, cancellationToken);

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) =>
        Client.WriteAsync(offset, data, cancellationToken);

    public override async ValueTask<bool> TryZeroAsync(long offset, long length, bool allocate, CancellationToken cancellationToken)
    {
        if (!Client.Export.CanWriteZeroes)
        {
            return false;
        }

        var flags = allocate ? CommandFlags.NoHole : CommandFlags.None;
        try
        {
            await Client.WriteZeroesAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
            return true;
        }
        catch (NbdServerErrorException exception) when (length > MaxRequestSize && exception.Error is NbdError.InvalidArgument or NbdError.Overflow or NbdError.NotSupported or NbdError.OutOfMemory)
        {
            // A long WRITE_ZEROES is allowed to fail "if that would cost too much" (proto.md): ask in payload-sized pieces.
            for (var position = offset; position < offset + length; position += MaxRequestSize)
            {
                await Client.WriteZeroesAsync(position, Math.Min(MaxRequestSize, offset + length - position), flags, cancellationToken).ConfigureAwait(false);
            }

            return true;
        }
    }

    public override async IAsyncEnumerable<SourceRun> GetRunsAsync(long offset, long length, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        if (!Client.Export.CanBlockStatus)
        {
            yield return new SourceRun(offset, length, false);
            yield break;
        }

        await foreach (var extent in Client.GetExtentsAsync(offset, length, MetaContexts.BaseAllocation, cancellationToken).ConfigureAwait(false))
        {
            // NBD_STATE_ZERO means "reads as zeroes"; a HOLE without ZERO has undefined contents and must be copied.
            yield return new SourceRun(extent.Offset, extent.Length, extent.IsZero);
        }
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken) =>
        Client.Export.CanFlush ? Client.FlushAsync(cancellationToken) : ValueTask.CompletedTask;

    public override ValueTask DisposeAsync() => Client.DisposeAsync();
}

/// <summary>A regular file or a block device through <see cref="FileBlockDevice"/> (pread, pwrite, fallocate, SEEK_DATA).</summary>
internal sealed class FileCopyEndpoint(FileBlockDevice device, string name) : CopyEndpoint
{
    public override string Name { get; } = name;

    public override string Kind => device.IsBlockDevice ? "block device" : "file";

    public override long Size => device.Size;

    public override int MinimumBlockSize => 1;

    public override bool CanZero => (device.Features & BlockDeviceFeatures.WriteZeroes) != 0;

    public override bool HasExtents => (device.Features & BlockDeviceFeatures.Extents) != 0;

    public override ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
        device.ReadAsync(offset, buffer, cancellationToken);

    /// <summary>
    /// Buffered writes to one file serialise on its inode lock in the kernel: dozens of copy workers writing at once
    /// only spin on it (a 1 GiB copy burnt 3 s of system time against 0.6 s with two writers), so at most this many
    /// write at a time. Reads are not limited.
    /// </summary>
    private const int MaxConcurrentWrites = 2;

    private readonly SemaphoreSlim _writers = new(MaxConcurrentWrites, MaxConcurrentWrites);

    public override async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        await _writers.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await device.WriteAsync(offset, data, fua: false, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _writers.Release();
        }
    }

    public override async ValueTask<bool> TryZeroAsync(long offset, long length, bool allocate, CancellationToken cancellationToken)
    {
        if (!CanZero)
        {
            return false;
        }

        await device.WriteZeroesAsync(offset, length, allocate ? ZeroFlags.NoHole : ZeroFlags.None, cancellationToken).ConfigureAwait(false);
        return true;
    }

    public override async IAsyncEnumerable<SourceRun> GetRunsAsync(long offset, long length, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        if (!HasExtents)
        {
            yield return new SourceRun(offset, length, false);
            yield break;
        }

        var extents = new ExtentList(4096);
        var position = offset;
        var end = offset + length;
        while (position < end)
        {
            extents.Clear(4096);
            await device.GetExtentsAsync(position, end - position, extents, cancellationToken).ConfigureAwait(false);
            if (extents.Count == 0)
            {
                // Nothing reported: treat the rest as data (always safe).
                yield return new SourceRun(position, end - position, false);
                yield break;
            }

            for (var i = 0; i < extents.Count; i++)
            {
                var extent = extents[i];
                yield return new SourceRun(position, extent.Length, (extent.Flags & AllocationFlags.Zero) != 0);
                position += extent.Length;
            }
        }
    }

    public override ValueTask FlushAsync(CancellationToken cancellationToken) => device.FlushAsync(cancellationToken);

    public override ValueTask DisposeAsync()
    {
        _writers.Dispose();
        return device.DisposeAsync();
    }

    /// <summary>Opens a source file or block device read-only.</summary>
    public static FileCopyEndpoint OpenSource(string path)
    {
        if (!File.Exists(path) && !path.StartsWith("/dev/", StringComparison.Ordinal))
        {
            throw new FileNotFoundException($"source '{path}' does not exist");
        }

        return new FileCopyEndpoint(FileBlockDevice.Open(path, readOnly: true), path);
    }

    /// <summary>
    /// Opens the destination: a block device (which must be at least <paramref name="size"/> bytes), an existing
    /// regular file (emptied and resized to <paramref name="size"/>, like cp) or a new sparse file. A file made or
    /// emptied here reads as zeroes, so holes need not be written at all.
    /// </summary>
    public static async Task<FileCopyEndpoint> OpenDestinationAsync(string path, long size)
    {
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (directory is not null && !Directory.Exists(directory))
        {
            throw new DirectoryNotFoundException($"destination directory '{directory}' does not exist");
        }

        if (File.Exists(path) || path.StartsWith("/dev/", StringComparison.Ordinal))
        {
            var existing = FileBlockDevice.Open(path, readOnly: false);
            if (existing.IsBlockDevice)
            {
                return new FileCopyEndpoint(existing, path);
            }

            await existing.DisposeAsync().ConfigureAwait(false);
            using (var stream = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
            {
                stream.SetLength(0);
                stream.SetLength(size);
            }

            return new FileCopyEndpoint(FileBlockDevice.Open(path, readOnly: false), path) { IsZero = true };
        }

        return new FileCopyEndpoint(FileBlockDevice.Open(path, readOnly: false, createSize: size), path) { IsZero = true };
    }
}

/// <summary>
/// <c>null:</c> as a destination: everything is read from the source and thrown away (as nbdcopy's null:), to
/// measure how fast a source can be read.
/// </summary>
internal sealed class NullCopyEndpoint(long size) : CopyEndpoint
{
    public const string DestinationName = "null:";

    public override string Name => DestinationName;

    public override string Kind => "null";

    public override long Size => size;

    public override bool CanZero => true;

    public override ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
        throw new NotSupportedException("null: can only be a destination");

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    public override ValueTask<bool> TryZeroAsync(long offset, long length, bool allocate, CancellationToken cancellationToken) => ValueTask.FromResult(true);

    public override ValueTask FlushAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    public override ValueTask DisposeAsync() => ValueTask.CompletedTask;
}
