using System.Buffers;
using Microsoft.Win32.SafeHandles;
using Spindle.Protocol;

namespace Spindle.Storage.Qcow2;

public sealed partial class Qcow2Image
{
    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        ReadGuest(offset, destination.Span);
        return ValueTask.CompletedTask;
    }

    /// <summary>Reads guest bytes: data clusters straight from the file (outside the metadata lock), zero clusters as
    /// zeroes, unallocated ones through the backing chain, compressed ones decompressed.</summary>
    internal void ReadGuest(long offset, Span<byte> destination)
    {
        _gate.Enter();
        try
        {
            var done = 0;
            while (done < destination.Length)
            {
                var guest = offset + done;
                Run run;
                lock (_meta)
                {
                    run = MapRunLocked(guest, destination.Length - done);
                }

                var part = destination.Slice(done, (int)Math.Min(run.Length, destination.Length - done));
                ReadRun(run, guest, part);
                done += part.Length;
            }
        }
        finally
        {
            _gate.Exit();
        }
    }

    /// <summary>
    /// Serves a read at once when its L2 tables are cached and its data is in the page cache (preadv2 RWF_NOWAIT);
    /// unallocated clusters come from a backing layer that can read them at once (or are zeroes with none); anything
    /// else (a table to load, a backing layer that would wait, a compressed cluster) goes through <see cref="ReadAsync"/>.
    /// </summary>
    public override bool TryReadImmediate(long offset, Span<byte> destination)
    {
        _gate.Enter();
        try
        {
            var done = 0;
            while (done < destination.Length)
            {
                var guest = offset + done;
                Run run;
                lock (_meta)
                {
                    if (!IsMappingCachedLocked(guest))
                    {
                        return false;
                    }

                    run = MapRunLocked(guest, destination.Length - done);
                }

                var part = destination.Slice(done, (int)Math.Min(run.Length, destination.Length - done));
                switch (run.Kind)
                {
                    case RunKind.Data when _file.TryReadCached(part, run.Host):
                    case RunKind.Unallocated when TryReadBackingImmediate(guest, part):
                        break;
                    case RunKind.Zero:
                        part.Clear();
                        break;
                    default:
                        return false;
                }

                done += part.Length;
            }

            return true;
        }
        catch (BlockDeviceException)
        {
            return false; // ReadAsync reports it
        }
        finally
        {
            _gate.Exit();
        }
    }

    private bool IsMappingCachedLocked(long guest)
    {
        var l1Index = (guest >> _clusterBits) >> _l2Bits;
        if (l1Index >= _l1.Length)
        {
            return true;
        }

        var l2Offset = (long)(_l1[l1Index] & OffsetMask);
        return l2Offset == 0 || _l2Cache.TryGet(l2Offset, out _);
    }

    private void ReadRun(in Run run, long guest, Span<byte> destination)
    {
        switch (run.Kind)
        {
            case RunKind.Data:
                _file.Read(destination, run.Host);
                break;
            case RunKind.Zero:
                destination.Clear();
                break;
            case RunKind.Unallocated:
                ReadBacking(guest, destination);
                break;
            case RunKind.Compressed:
                ReadCompressed(run.Entry, (int)(guest & _clusterMask), destination);
                break;
        }
    }

    /// <summary>
    /// <see cref="ReadBacking"/> done at once or not at all: the backing layer reads at once (its own tables cached, its
    /// data in the page cache), or there is none. A persistent overlay's reads of its base go this way.
    /// </summary>
    private bool TryReadBackingImmediate(long guest, Span<byte> destination)
    {
        var backing = _backing;
        var inside = backing is null ? 0 : (int)Math.Clamp(backing.Size - guest, 0, destination.Length);
        if (inside > 0 && !backing!.TryReadLayerImmediate(guest, destination[..inside]))
        {
            return false;
        }

        destination[inside..].Clear();
        return true;
    }

    /// <summary>Reads from the backing chain; what lies past the backing file's end (or with no backing file) is zeroes.</summary>
    private void ReadBacking(long guest, Span<byte> destination)
    {
        var backing = _backing;
        var inside = backing is null ? 0 : (int)Math.Clamp(backing.Size - guest, 0, destination.Length);
        if (inside > 0)
        {
            backing!.ReadLayer(guest, destination[..inside]);
        }

        destination[inside..].Clear();
    }

    private void ReadCompressed(ulong entry, int inCluster, Span<byte> destination)
    {
        var cluster = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            if (!TryDecompress(entry, cluster.AsSpan(0, _clusterSize), out var failure))
            {
                throw Corrupt(failure);
            }

            cluster.AsSpan(inCluster, destination.Length).CopyTo(destination);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(cluster);
        }
    }

    private bool TryDecompress(ulong entry, Span<byte> cluster, out string failure)
    {
        var (offset, length) = CompressedRange(entry);
        length = (int)Math.Min(length, _file.Length - offset);
        var compressed = ArrayPool<byte>.Shared.Rent(Math.Max(length, 1));
        try
        {
            _file.Read(compressed.AsSpan(0, length), offset);
            if (!Qcow2Compression.TryDecompress(_header.CompressionType, compressed, length, cluster))
            {
                failure = $"the compressed cluster at 0x{offset:x} ({length} bytes) does not decompress to a full cluster";
                return false;
            }

            failure = string.Empty;
            return true;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(compressed);
        }
    }

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        DescribeGuest(offset, length, extents);
        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// base:allocation as qemu reports it for qcow2: data and compressed clusters are data, zero clusters hole|zero,
    /// unallocated ones what the backing chain says (hole|zero with no backing file or past its end).
    /// </summary>
    internal void DescribeGuest(long offset, long length, ExtentList extents)
    {
        var end = offset + length;
        var position = offset;
        while (position < end && !extents.IsFull)
        {
            Run run;
            lock (_meta)
            {
                run = MapRunLocked(position, end - position);
            }

            switch (run.Kind)
            {
                case RunKind.Data or RunKind.Compressed:
                    extents.Add(run.Length, RunFlags.Data);
                    break;
                case RunKind.Zero:
                    extents.Add(run.Length, RunFlags.Zero);
                    break;
                default:
                    DescribeBacking(position, run.Length, extents);
                    break;
            }

            position += run.Length;
        }
    }

    private void DescribeBacking(long position, long length, ExtentList extents)
    {
        var backing = _backing;
        var inside = backing is null ? 0 : Math.Clamp(backing.Size - position, 0, length);
        if (inside > 0)
        {
            var before = extents.TotalLength;
            backing!.DescribeLayer(position, inside, extents);
            if (extents.TotalLength - before < inside)
            {
                return; // the list filled up
            }
        }

        extents.Add(length - inside, RunFlags.Zero);
    }

    /// <summary>
    /// qemu:allocation-depth (qemu docs/interop/nbd.rst): 0 where no image of the chain allocates the bytes, 1 where
    /// this image does (data, compressed or zero clusters), 2 for its backing file and so on. Past the end of a
    /// shorter backing file the zeroes count as allocated by that backing file, as qemu counts them.
    /// </summary>
    internal long DepthOf(long offset, long length, out int depth)
    {
        Run run;
        lock (_meta)
        {
            run = MapRunLocked(offset, length);
        }

        if (run.Kind != RunKind.Unallocated)
        {
            depth = 1;
            return run.Length;
        }

        var backing = _backing;
        if (backing is null)
        {
            depth = 0;
            return run.Length;
        }

        if (offset >= backing.Size)
        {
            depth = 2;
            return run.Length;
        }

        var span = backing.DepthLayer(offset, Math.Min(run.Length, backing.Size - offset), out var below);
        depth = below == 0 ? 0 : below + 1;
        return span;
    }

    void IChainLayer.ReadLayer(long offset, Span<byte> destination) => ReadGuest(offset, destination);

    bool IChainLayer.TryReadLayerImmediate(long offset, Span<byte> destination) => TryReadImmediate(offset, destination);

    void IChainLayer.DescribeLayer(long offset, long length, ExtentList extents) => DescribeGuest(offset, length, extents);

    long IChainLayer.DepthLayer(long offset, long length, out int depth) => DepthOf(offset, length, out depth);

    private void OpenBacking(Qcow2OpenOptions options, List<string> chain)
    {
        var name = _header.BackingFile;
        if (name is null || !options.OpenBackingChain)
        {
            return;
        }

        if (name.Contains("://", StringComparison.Ordinal) || name.StartsWith("json:", StringComparison.Ordinal) || name.Length == 0 || name.Contains('\0', StringComparison.Ordinal))
        {
            throw new Qcow2FormatException($"{_file.Path}: the backing file '{name}' is not a local file name");
        }

        if (chain.Count > options.MaxBackingDepth)
        {
            throw new Qcow2FormatException($"{_file.Path}: the backing chain is deeper than {options.MaxBackingDepth} images");
        }

        var directory = System.IO.Path.GetDirectoryName(_file.Path) ?? "/";
        var path = System.IO.Path.GetFullPath(System.IO.Path.IsPathRooted(name) ? name : System.IO.Path.Combine(directory, name));
        if (options.OpenBackingFile is null && !File.Exists(path))
        {
            throw new FileNotFoundException($"{_file.Path}: its backing file '{name}' ({path}) does not exist", path);
        }

        var canonical = CanonicalPath(path);
        if (chain.Contains(canonical))
        {
            throw new Qcow2FormatException($"{_file.Path}: the backing chain loops ({string.Join(" -> ", chain)} -> {canonical})");
        }

        SafeFileHandle handle;
        try
        {
            handle = options.OpenBackingFile?.Invoke(path) ?? File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        }
        catch (FileNotFoundException exception)
        {
            throw new FileNotFoundException($"{_file.Path}: its backing file '{name}' ({path}) does not exist", path, exception);
        }
        catch (UnauthorizedAccessException exception)
        {
            throw new UnauthorizedAccessException($"{_file.Path}: its backing file '{name}' ({path}) cannot be opened: {exception.Message}", exception);
        }

        try
        {
            var format = _header.BackingFormat ?? (IsQcow2File(handle) ? "qcow2" : "raw");
            _backing = format switch
            {
                "qcow2" => OpenLayer(path, handle, options, readOnly: true, snapshot: null, chain),
                "raw" => new RawLayer(FileBlockDevice.FromHandle(handle, path, readOnly: true)),
                _ => throw new Qcow2FormatException($"{_file.Path}: the backing file format '{format}' is not supported (qcow2 or raw)"),
            };
        }
        catch
        {
            // OpenLayer and FromHandle dispose the handle themselves when they fail after taking it.
            if (_backing is null && !handle.IsClosed)
            {
                handle.Dispose();
            }

            throw;
        }
    }

    /// <summary>The images below this one, nearest first, as descriptions.</summary>
    public IReadOnlyList<string> BackingChain
    {
        get
        {
            var list = new List<string>();
            for (var layer = _backing; layer is not null; layer = (layer as Qcow2Image)?._backing)
            {
                list.Add(layer.Description);
            }

            return list;
        }
    }

    /// <summary>qemu:allocation-depth as a metadata context.</summary>
    private sealed class AllocationDepthContext(Qcow2Image image) : MetaContextSource
    {
        public override string Name => "qemu:allocation-depth";

        public override ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken)
        {
            ArgumentNullException.ThrowIfNull(status);
            var end = offset + length;
            var position = offset;
            while (position < end && !status.IsFull)
            {
                var span = image.DepthOf(position, end - position, out var depth);
                if (span <= 0)
                {
                    throw new BlockDeviceException(NbdError.IO, $"allocation depth at {position} could not be determined");
                }

                status.Add(span, (uint)depth);
                position += span;
            }

            return ValueTask.CompletedTask;
        }
    }
}
