using System.Collections.Concurrent;
using System.Text;
using Spindle.Fuse.Kernel;
using Spindle.Fuse.Native;
using Spindle.Protocol;
using Spindle.Storage;
using Errno = Spindle.Protocol.Errno;

namespace Spindle.Fuse;

/// <summary>
/// The file system a mount shows: a root directory holding one regular file whose bytes are the device's. This is
/// the mapping from file operations to block device operations; <see cref="FuseSession"/> carries them over
/// /dev/fuse. Every method answers with an errno (0 for success) or a pending device operation.
/// </summary>
/// <remarks>
/// The mapping, which follows what Linux does for a real block device (block/fops.c):
/// <list type="bullet">
/// <item>write() through a handle opened with O_SYNC/O_DSYNC, or pwritev2(RWF_DSYNC): a FUA write (or write +
/// FLUSH when the device has no FUA);</item>
/// <item>fsync(), fdatasync(): FLUSH (syncfs() too, where the kernel forwards it: it does so for virtiofs only);</item>
/// <item>fallocate(PUNCH_HOLE|KEEP_SIZE): WRITE_ZEROES that may deallocate (NBD's "trim that reads back as zeroes":
/// a plain TRIM leaves the contents undefined, which fallocate does not allow, and a loop device turns both
/// discards and REQ_OP_WRITE_ZEROES into this call);</item>
/// <item>fallocate(ZERO_RANGE): WRITE_ZEROES with NO_HOLE;</item>
/// <item>any other fallocate mode: EOPNOTSUPP (the size is fixed; posix_fallocate then emulates);</item>
/// <item>truncate to another size: EPERM (the size is the device's);</item>
/// <item>write at or past the end: ENOSPC, a write across it is short (as for a block device).</item>
/// </list>
/// </remarks>
internal sealed class BlockDeviceFile
{
    public const ulong FileNodeId = 2;

    private const uint DirectoryNLink = 2;
    private static readonly long EntryTimeoutSeconds = 3600;

    private readonly BlockDevice _device;
    private readonly BlockDeviceFeatures _features;
    private readonly byte[] _name;
    private readonly bool _pageCache;
    private readonly uint _blockSize;
    private readonly ConcurrentDictionary<ulong, uint> _handles = new();
    private readonly Lock _attributesLock = new();
    private long _nextHandle;
    private long _size;
    private NodeAttributes _file;
    private NodeAttributes _directory;

    public BlockDeviceFile(BlockDevice device, FuseMountOptions options)
    {
        _device = device;
        _features = device.Features;
        _size = device.Size;
        ReadOnly = options.ReadOnly || (_features & BlockDeviceFeatures.Write) == 0;
        FileName = options.FileName;
        _name = Encoding.UTF8.GetBytes(options.FileName);
        _pageCache = options.PageCache;
        _blockSize = device.BlockSizes is { } sizes && sizes.Preferred is >= 512 and <= 1024 * 1024 ? sizes.Preferred : 4096;

        var uid = options.Uid ?? LibC.GetEffectiveUserId();
        var gid = options.Gid ?? LibC.GetEffectiveGroupId();
        var now = DateTimeOffset.UtcNow;
        var fileMode = (uint)(options.FileMode ?? (ReadOnly ? UnixFileMode.UserRead : UnixFileMode.UserRead | UnixFileMode.UserWrite));
        if (ReadOnly)
        {
            fileMode &= ~(uint)(UnixFileMode.UserWrite | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite);
        }

        _file = new NodeAttributes(FuseConstants.SIfReg | fileMode, uid, gid, now, now);
        var directoryMode = (uint)(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute |
                                   UnixFileMode.GroupRead | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
        _directory = new NodeAttributes(FuseConstants.SIfDir | directoryMode, uid, gid, now, now);
    }

    /// <summary>The file's size: the device's when mounted, larger once <see cref="TryGrow"/> saw the device grow.</summary>
    public long Size => Volatile.Read(ref _size);

    /// <summary>
    /// Takes the device's size if it grew (an NBD export resized online that the client reconnected to). Never
    /// shrinks: what was written near the old end stays reachable, and the device refuses requests past its end.
    /// </summary>
    public bool TryGrow(out long oldSize, out long newSize)
    {
        oldSize = Size;
        newSize = _device.Size;
        if (newSize <= oldSize)
        {
            return false;
        }

        Volatile.Write(ref _size, newSize);
        return true;
    }

    public bool ReadOnly { get; }

    public string FileName { get; }

    public BlockDevice Device => _device;

    /// <summary>Handles currently open on the file.</summary>
    public int OpenHandles => _handles.Count;

    public int Lookup(ulong parent, ReadOnlySpan<byte> name, out FuseEntryOut entry)
    {
        entry = default;
        if (parent != FuseConstants.RootNodeId)
        {
            return Errno.ENOTDIR;
        }

        var terminator = name.IndexOf((byte)0);
        if (terminator >= 0)
        {
            name = name[..terminator];
        }

        if (!name.SequenceEqual(_name))
        {
            return Errno.ENOENT;
        }

        entry.NodeId = FileNodeId;
        entry.Generation = 1;
        entry.EntryValid = (ulong)EntryTimeoutSeconds;
        entry.AttrValid = (ulong)EntryTimeoutSeconds;
        entry.Attr = Attributes(FileNodeId);
        return 0;
    }

    public int GetAttr(ulong node, out FuseAttrOut result)
    {
        result = default;
        if (node != FuseConstants.RootNodeId && node != FileNodeId)
        {
            return Errno.ENOENT;
        }

        result.AttrValid = (ulong)EntryTimeoutSeconds;
        result.Attr = Attributes(node);
        return 0;
    }

    public int SetAttr(ulong node, in FuseSetAttrIn change, out FuseAttrOut result)
    {
        result = default;
        if (node != FuseConstants.RootNodeId && node != FileNodeId)
        {
            return Errno.ENOENT;
        }

        if ((change.Valid & FuseSetAttrValid.Size) != 0)
        {
            if (node != FileNodeId)
            {
                return Errno.EISDIR;
            }

            if (ReadOnly)
            {
                return Errno.EROFS;
            }

            if (change.FileSize != (ulong)Size)
            {
                // The size is the device's: a disk cannot be truncated or grown through its file.
                return Errno.EPERM;
            }
        }

        lock (_attributesLock)
        {
            ref var attributes = ref node == FileNodeId ? ref _file : ref _directory;
            if ((change.Valid & FuseSetAttrValid.Mode) != 0)
            {
                var permissions = change.Mode & 0xFFF;
                if (node == FileNodeId && ReadOnly)
                {
                    permissions &= ~(uint)(UnixFileMode.UserWrite | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite);
                }

                attributes.Mode = (attributes.Mode & ~0xFFFu) | permissions;
            }

            if ((change.Valid & FuseSetAttrValid.Uid) != 0)
            {
                attributes.Uid = change.Uid;
            }

            if ((change.Valid & FuseSetAttrValid.Gid) != 0)
            {
                attributes.Gid = change.Gid;
            }

            var now = DateTimeOffset.UtcNow;
            if ((change.Valid & FuseSetAttrValid.ATimeNow) != 0)
            {
                attributes.ATime = now;
            }
            else if ((change.Valid & FuseSetAttrValid.ATime) != 0)
            {
                attributes.ATime = FromUnix(change.ATime, change.ATimeNsec);
            }

            if ((change.Valid & FuseSetAttrValid.MTimeNow) != 0)
            {
                attributes.MTime = now;
            }
            else if ((change.Valid & FuseSetAttrValid.MTime) != 0)
            {
                attributes.MTime = FromUnix(change.MTime, change.MTimeNsec);
            }

            attributes.CTime = now;
        }

        result.AttrValid = (ulong)EntryTimeoutSeconds;
        result.Attr = Attributes(node);
        return 0;
    }

    public int Open(ulong node, uint flags, out FuseOpenOut result)
    {
        result = default;
        if (node != FileNodeId)
        {
            return node == FuseConstants.RootNodeId ? Errno.EISDIR : Errno.ENOENT;
        }

        var access = flags & FuseConstants.OAccessMode;
        if (ReadOnly && access != 0)
        {
            return Errno.EROFS;
        }

        var handle = (ulong)Interlocked.Increment(ref _nextHandle);
        _handles[handle] = flags;
        result.Handle = handle;

        // Direct I/O by default: a block device caches nothing of its own, and a loop device or file system above
        // does the caching. Parallel direct writes keep the inode lock from serialising writers; NOFLUSH skips a
        // round trip on every close (close promises no durability; fsync does).
        result.OpenFlags = FuseOpenFlags.NoFlush | FuseOpenFlags.ParallelDirectWrites |
                           (_pageCache ? FuseOpenFlags.KeepCache : FuseOpenFlags.DirectIo);
        return 0;
    }

    public int OpenDirectory(ulong node, out FuseOpenOut result)
    {
        result = default;
        if (node != FuseConstants.RootNodeId)
        {
            return node == FileNodeId ? Errno.ENOTDIR : Errno.ENOENT;
        }

        result.OpenFlags = FuseOpenFlags.CacheDir | FuseOpenFlags.KeepCache;
        return 0;
    }

    public void Release(ulong handle) => _handles.TryRemove(handle, out _);

    /// <summary>Whether writes through <paramref name="handle"/> must be durable before they complete.</summary>
    public bool IsSyncHandle(ulong handle) => _handles.TryGetValue(handle, out var flags) && (flags & FuseConstants.ODsync) != 0;

    /// <summary>Clamps a read to the end of the device: returns the byte count to read (0 at or past the end).</summary>
    public int ClampRead(ulong offset, uint length) =>
        offset >= (ulong)Size ? 0 : (int)Math.Min(length, (ulong)Size - offset);

    /// <summary>Clamps a write to the end of the device; returns 0 or the errno (ENOSPC at or past the end).</summary>
    public int ClampWrite(ulong offset, uint length, out int count)
    {
        count = 0;
        if (ReadOnly)
        {
            return Errno.EROFS;
        }

        if (length == 0)
        {
            return 0;
        }

        if (offset >= (ulong)Size)
        {
            return Errno.ENOSPC;
        }

        count = (int)Math.Min(length, (ulong)Size - offset);
        return 0;
    }

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        _device.ReadAsync(offset, destination, cancellationToken);

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        if (!fua || (_features & BlockDeviceFeatures.Fua) != 0 || (_features & BlockDeviceFeatures.Flush) == 0)
        {
            // A device without FLUSH has no volatile cache: its writes are durable when they complete.
            return _device.WriteAsync(offset, source, fua && (_features & BlockDeviceFeatures.Fua) != 0, cancellationToken);
        }

        return WriteThenFlushAsync(offset, source, cancellationToken);
    }

    /// <summary>fsync and fdatasync: every completed write becomes durable.</summary>
    public ValueTask FlushAsync(CancellationToken cancellationToken) =>
        (_features & BlockDeviceFeatures.Flush) != 0 ? _device.FlushAsync(cancellationToken) : ValueTask.CompletedTask;

    /// <summary>Maps a fallocate call (see the class remarks); returns 0 with the operation to wait for, or an errno.</summary>
    public int Fallocate(uint mode, ulong offset, ulong length, CancellationToken cancellationToken, out ValueTask operation)
    {
        operation = ValueTask.CompletedTask;
        if (ReadOnly)
        {
            return Errno.EROFS;
        }

        var keepSize = (mode & FuseConstants.FallocKeepSize) != 0;
        var end = offset + length;
        if (length == 0 || end < offset)
        {
            return Errno.EINVAL;
        }

        if (!keepSize && end > (ulong)Size)
        {
            // Only KEEP_SIZE calls may reach past the end: anything else would have to grow the device.
            return Errno.ENOSPC;
        }

        ZeroFlags flags;
        switch (mode & ~FuseConstants.FallocKeepSize)
        {
            case FuseConstants.FallocPunchHole when keepSize:
                flags = ZeroFlags.None;
                break;
            case FuseConstants.FallocZeroRange:
                flags = ZeroFlags.NoHole;
                break;
            default:
                return Errno.EOPNOTSUPP;
        }

        if (offset >= (ulong)Size)
        {
            return 0;
        }

        if ((_features & BlockDeviceFeatures.WriteZeroes) == 0)
        {
            return Errno.EOPNOTSUPP;
        }

        var clamped = (long)Math.Min(length, (ulong)Size - offset);
        operation = _device.WriteZeroesAsync((long)offset, clamped, flags, cancellationToken);
        return 0;
    }

    /// <summary>
    /// lseek(SEEK_DATA/SEEK_HOLE) from the device's allocation map. Returns 0 and the offset, or an errno
    /// (ENXIO: no data after the offset, or the offset is at or past the end).
    /// </summary>
    public async ValueTask<(int Errno, long Offset)> SeekAsync(ulong offset, uint whence, CancellationToken cancellationToken)
    {
        if (whence is not (FuseConstants.SeekData or FuseConstants.SeekHole))
        {
            return (Errno.EINVAL, 0);
        }

        if (offset >= (ulong)Size)
        {
            return (Errno.ENXIO, 0);
        }

        var wantData = whence == FuseConstants.SeekData;
        if ((_features & BlockDeviceFeatures.Extents) == 0)
        {
            // Without an allocation map everything is data, and the only hole is the end.
            return wantData ? (0, (long)offset) : (0, Size);
        }

        var extents = new ExtentList(256);
        var position = (long)offset;
        for (var round = 0; round < 1_000_000 && position < Size; round++)
        {
            extents.Clear(256);
            var length = Math.Min(Size - position, 1L << 40);
            await _device.GetExtentsAsync(position, length, extents, cancellationToken).ConfigureAwait(false);
            if (extents.Count == 0)
            {
                break;
            }

            foreach (var extent in extents.Items)
            {
                var isHole = (extent.Flags & AllocationFlags.Hole) != 0;
                if (isHole != wantData)
                {
                    return (0, position);
                }

                position += extent.Length;
            }
        }

        return wantData ? (Errno.ENXIO, 0) : (0, Size);
    }

    /// <summary>Writes the directory listing from <paramref name="offset"/> into <paramref name="destination"/>; returns the bytes used.</summary>
    public int ReadDirectory(ulong offset, Span<byte> destination)
    {
        var used = 0;
        for (var index = offset; index < 3; index++)
        {
            var isFile = index >= 2;
            var ino = isFile ? FileNodeId : FuseConstants.RootNodeId;
            var type = isFile ? FuseConstants.DtReg : FuseConstants.DtDir;
            ReadOnlySpan<byte> name = index switch
            {
                0 => "."u8,
                1 => ".."u8,
                _ => _name,
            };
            var recordLength = (FuseDirent.Size + name.Length + 7) & ~7;
            if (used + recordLength > destination.Length)
            {
                break;
            }

            var record = destination.Slice(used, recordLength);
            record.Clear();
            var dirent = new FuseDirent { Ino = ino, Offset = index + 1, NameLength = (uint)name.Length, Type = type };
            System.Runtime.InteropServices.MemoryMarshal.Write(record, in dirent);
            name.CopyTo(record[FuseDirent.Size..]);
            used += recordLength;
        }

        return used;
    }

    public FuseStatFsOut StatFs()
    {
        var blocks = ((ulong)Size + _blockSize - 1) / _blockSize;
        return new FuseStatFsOut
        {
            Blocks = blocks,
            Files = 2,
            BlockSize = _blockSize,
            FragmentSize = _blockSize,
            NameLength = 255,
        };
    }

    /// <summary>The errno a failed device operation is reported with.</summary>
    public static int ToErrno(Exception exception) => exception switch
    {
        BlockDeviceException device => Errno.FromNbdError(device.Error),

        // On Unix, .NET carries the errno of a failed system call in an IOException's HResult.
        IOException io when io.HResult is > 0 and < 4096 => io.HResult,
        UnauthorizedAccessException => Errno.EACCES,
        OutOfMemoryException => Errno.ENOMEM,
        ArgumentException => Errno.EINVAL,
        NotSupportedException => Errno.EOPNOTSUPP,
        TimeoutException => Errno.ETIMEDOUT,
        _ => Errno.EIO,
    };

    private async ValueTask WriteThenFlushAsync(long offset, ReadOnlyMemory<byte> source, CancellationToken cancellationToken)
    {
        await _device.WriteAsync(offset, source, fua: false, cancellationToken).ConfigureAwait(false);
        await _device.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    private FuseAttr Attributes(ulong node)
    {
        NodeAttributes attributes;
        lock (_attributesLock)
        {
            attributes = node == FileNodeId ? _file : _directory;
        }

        var isFile = node == FileNodeId;
        var size = isFile ? (ulong)Size : 0;
        return new FuseAttr
        {
            Ino = node,
            FileSize = size,
            Blocks = (size + 511) / 512,
            ATime = (ulong)attributes.ATime.ToUnixTimeSeconds(),
            ATimeNsec = Nanoseconds(attributes.ATime),
            MTime = (ulong)attributes.MTime.ToUnixTimeSeconds(),
            MTimeNsec = Nanoseconds(attributes.MTime),
            CTime = (ulong)attributes.CTime.ToUnixTimeSeconds(),
            CTimeNsec = Nanoseconds(attributes.CTime),
            Mode = attributes.Mode,
            NLink = isFile ? 1 : DirectoryNLink,
            Uid = attributes.Uid,
            Gid = attributes.Gid,
            BlockSize = _blockSize,
        };
    }

    private static uint Nanoseconds(DateTimeOffset time) => (uint)(time.UtcTicks % TimeSpan.TicksPerSecond * 100);

    private static DateTimeOffset FromUnix(ulong seconds, uint nanoseconds) =>
        DateTimeOffset.FromUnixTimeSeconds((long)Math.Min(seconds, 253402300799UL)).AddTicks(nanoseconds / 100);

    private struct NodeAttributes(uint mode, uint uid, uint gid, DateTimeOffset created, DateTimeOffset modified)
    {
        public uint Mode = mode;
        public uint Uid = uid;
        public uint Gid = gid;
        public DateTimeOffset ATime = modified;
        public DateTimeOffset MTime = modified;
        public DateTimeOffset CTime = created;
    }
}
