using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Spindle.Fuse.Logging;
using Spindle.Fuse.Native;
using Spindle.Storage;
using Errno = Spindle.Protocol.Errno;

namespace Spindle.Fuse;

/// <summary>
/// A <see cref="BlockDevice"/> exposed as one regular file in a FUSE mount: <c>MOUNTPOINT/disk</c> reads and writes
/// the device, fsync flushes it, O_SYNC writes are FUA, fallocate punches and zeroes. Suitable for a loop device
/// (see <c>Devices.LoopDevice</c>) and a file system on top.
/// </summary>
/// <remarks>
/// The caller keeps ownership of the device. Disposing unmounts (lazily if the file is still in use, waiting up to
/// <see cref="FuseMountOptions.UnmountTimeout"/> for the last user before aborting the connection) and then flushes
/// the device, so every write acknowledged through the file is durable on the device once disposal returns.
/// </remarks>
public sealed class FuseMount : IAsyncDisposable
{
    private readonly FuseSession _session;
    private readonly FuseDevice _fuse;
    private readonly FuseMountOptions _options;
    private readonly ILogger _logger;
    private readonly int? _connectionId;
    private Timer? _sizeWatch;
    private int _disposed;

    /// <summary>How often the device's size is compared with the file's: a resize is rare, and a second is soon enough.</summary>
    private static readonly TimeSpan SizeCheckPeriod = TimeSpan.FromSeconds(1);

    private FuseMount(FuseSession session, FuseDevice fuse, FuseMountOptions options, string mountPoint, int? connectionId, FuseMounter mounter, ILogger logger)
    {
        _session = session;
        _fuse = fuse;
        _options = options;
        _logger = logger;
        _connectionId = connectionId;
        MountPoint = mountPoint;
        FilePath = Path.Combine(mountPoint, options.FileName);
        Mounter = mounter;
    }

    /// <summary>The directory the file system is mounted on.</summary>
    public string MountPoint { get; }

    /// <summary>The file that exposes the device.</summary>
    public string FilePath { get; }

    /// <summary>How the mount was made.</summary>
    public FuseMounter Mounter { get; }

    /// <summary>Whether the file is read-only.</summary>
    public bool ReadOnly => _session.File.ReadOnly;

    /// <summary>Handles currently open on the file (a bound loop device holds one).</summary>
    public int OpenHandles => _session.File.OpenHandles;

    /// <summary>Requests served so far.</summary>
    public long RequestCount => _session.RequestCount;

    /// <summary>Threads currently reading requests.</summary>
    public int ThreadCount => _session.ThreadCount;

    /// <summary>
    /// Completes when the kernel has ended the connection (the mount was unmounted, by this object or by anyone
    /// with umount, or aborted) and every request is answered.
    /// </summary>
    public Task Completion => _session.Completion;

    /// <summary>
    /// Mounts <paramref name="device"/> on the existing directory <paramref name="mountPoint"/> and returns once the
    /// kernel has initialised the connection, so the file is ready to use.
    /// </summary>
    /// <exception cref="FuseMountException">
    /// The directory is missing (ENOENT) or not a directory (ENOTDIR), something is already mounted there (EBUSY;
    /// a stale Spindle mount is replaced when <see cref="FuseMountOptions.RecoverStaleMount"/>), mounting is not
    /// allowed (EPERM), or the kernel did not initialise the connection in time (ETIMEDOUT).
    /// </exception>
    public static async Task<FuseMount> MountAsync(BlockDevice device, string mountPoint, FuseMountOptions? options = null, ILogger? logger = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentException.ThrowIfNullOrEmpty(mountPoint);
        var settings = (options ?? new FuseMountOptions()).Validated();
        logger ??= NullLogger.Instance;
        var path = ResolveMountPoint(mountPoint);

        CheckMountPoint(path, settings, logger);
        var file = new BlockDeviceFile(device, settings);
        var (fuse, mounter) = MountKernel(path, file, settings, device);
        var entry = MountTable.Find(path);
        var session = new FuseSession(fuse, file, settings, path, logger);
        session.Start();

        var mount = new FuseMount(session, fuse, settings, path, entry?.ConnectionId, mounter, logger);
        try
        {
            var info = await session.Initialized.WaitAsync(settings.InitTimeout, cancellationToken).ConfigureAwait(false);
            FuseLog.Initialized(logger, path, info.KernelMajor, info.KernelMinor, info.Minor, info.MaxWrite, info.MaxPages, info.Flags.ToString());
        }
        catch (Exception exception)
        {
            await mount.DisposeCoreAsync(flush: false).ConfigureAwait(false);
            if (exception is TimeoutException)
            {
                throw new FuseMountException(Errno.ETIMEDOUT, $"{path}: the kernel did not initialise the FUSE connection within {settings.InitTimeout.TotalSeconds} s");
            }

            throw;
        }

        FuseLog.Mounted(logger, path, mount.FilePath, file.Size, file.ReadOnly ? "read-only" : "read-write", device.Description, mounter.ToString());
        mount._sizeWatch = new Timer(static state => ((FuseMount)state!).CheckSize(), mount, SizeCheckPeriod, SizeCheckPeriod);
        return mount;
    }

    /// <summary>
    /// Unmounts. Fails with EBUSY (and stays mounted) while the file is in use, unless <paramref name="lazy"/>: then
    /// the mount is detached from the directory at once and served until its last user closes it, which
    /// <see cref="Completion"/> reports.
    /// </summary>
    public async Task UnmountAsync(bool lazy = false, CancellationToken cancellationToken = default)
    {
        if (_session.Ended)
        {
            return;
        }

        var errno = MountTable.Unmount(MountPoint, lazy: false);
        var detached = false;
        if (errno == Errno.EBUSY && lazy)
        {
            FuseLog.BusyDetached(_logger, MountPoint, OpenHandles);
            errno = MountTable.Unmount(MountPoint, lazy: true);
            detached = errno == 0;
        }

        if (errno is not 0 and not Errno.EINVAL and not Errno.ENOENT)
        {
            throw new FuseMountException(errno, errno == Errno.EBUSY
                ? $"{MountPoint} is busy: {OpenHandles} open handles (a loop device bound to {FilePath}? detach it first)"
                : $"cannot unmount {MountPoint}: {Errno.Describe(errno)}");
        }

        if (!detached)
        {
            // Unmounted: the kernel ends the connection right away and the readers see ENODEV. (A detached mount
            // ends only when its last user closes it, which Completion reports.)
            await Completion.WaitAsync(_options.UnmountTimeout, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Ends the connection at once (through fusectl, else a forced unmount): requests waiting on it fail, and the
    /// mount, if still attached, answers ENOTCONN until unmounted. For a mount that cannot be released otherwise.
    /// </summary>
    public void Abort()
    {
        if (_session.Ended)
        {
            return;
        }

        FuseLog.Aborting(_logger, MountPoint);
        _session.CancelOperations();
        if (_connectionId is not { } id || !MountTable.AbortConnection(id))
        {
            // Without fusectl: a forced unmount aborts a FUSE connection too (fuse_umount_begin), and unmounts
            // if nothing holds the mount. Only while the mount is still attached to the directory.
            if (MountTable.Find(MountPoint) is { IsSpindle: true } entry && entry.ConnectionId == _connectionId)
            {
                _ = LibC.Unmount(MountPoint, LibC.MntForce);
            }
        }
    }

    public ValueTask DisposeAsync() => DisposeCoreAsync(flush: true);

    /// <summary>
    /// Follows a device that grows (an NBD export resized online, once the client has reconnected and taken the
    /// larger size): the file takes the new size and the kernel is told to forget the old one.
    /// </summary>
    private void CheckSize()
    {
        if (Volatile.Read(ref _disposed) != 0 || _session.Ended || !_session.File.TryGrow(out var oldSize, out var newSize))
        {
            return;
        }

        var errno = _session.NotifyAttributesChanged(BlockDeviceFile.FileNodeId);
        FuseLog.FileGrew(_logger, MountPoint, FilePath, oldSize, newSize, errno is 0 or Errno.ENOENT ? "ok" : Errno.Describe(errno));
    }

    private async ValueTask DisposeCoreAsync(bool flush)
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        if (_sizeWatch is { } watch)
        {
            await watch.DisposeAsync().ConfigureAwait(false);
        }

        if (!_session.Ended)
        {
            try
            {
                await UnmountAsync(lazy: true).ConfigureAwait(false);
                await Completion.WaitAsync(_options.UnmountTimeout).ConfigureAwait(false);
            }
            catch (Exception exception) when (exception is TimeoutException or FuseMountException)
            {
                Abort();
                _ = MountTable.Unmount(MountPoint, lazy: true);
            }
        }

        // An aborted connection leaves its mount behind (stale, ENOTCONN): detach it. A live mount found there is
        // not ours (connection ids are reused, so a replacement may even carry the same one): leave it alone.
        if (MountTable.Find(MountPoint) is { IsSpindle: true } entry && entry.ConnectionId == _connectionId && MountTable.IsStale(MountPoint))
        {
            _ = MountTable.Unmount(MountPoint, lazy: true);
        }

        // Close /dev/fuse only once every reader has left it: a descriptor closed under a blocked read() could be
        // reused by an unrelated open and read from. If the readers are stuck, the descriptor is left open.
        var ended = await Task.WhenAny(Completion, Task.Delay(_options.UnmountTimeout)).ConfigureAwait(false) == Completion;
        if (ended)
        {
            _fuse.Dispose();
        }

        if (flush && !_session.File.ReadOnly && (_session.File.Device.Features & BlockDeviceFeatures.Flush) != 0)
        {
            try
            {
                await _session.File.Device.FlushAsync(CancellationToken.None).ConfigureAwait(false);
            }
            catch (Exception exception)
            {
                FuseLog.FinalFlushFailed(_logger, MountPoint, exception);
            }
        }

        FuseLog.Unmounted(_logger, MountPoint);
    }

    private static string ResolveMountPoint(string mountPoint)
    {
        var full = MountTable.Normalize(mountPoint);
        if (full == "/")
        {
            return full;
        }

        // Resolve symbolic links in the parent only: the mount point itself may be a stale mount that cannot be stat'ed.
        var parent = Path.GetDirectoryName(full)!;
        return Path.Combine(LibC.RealPath(parent) ?? parent, Path.GetFileName(full));
    }

    private static void CheckMountPoint(string path, FuseMountOptions options, ILogger logger)
    {
        var existing = MountTable.Find(path);
        if (existing is not null)
        {
            if (existing.IsFuse && MountTable.IsStale(path))
            {
                if (!existing.IsSpindle || !options.RecoverStaleMount)
                {
                    throw new FuseMountException(Errno.EBUSY,
                        $"{path} holds a stale FUSE mount ({existing.FileSystemType}, its server is gone): remove it with 'fusermount3 -u {path}' or 'umount -l {path}'");
                }

                FuseLog.RecoveringStaleMount(logger, path);
                var errno = MountTable.Unmount(path, lazy: true);
                if (errno != 0)
                {
                    throw new FuseMountException(errno, $"cannot remove the stale mount on {path}: {Errno.Describe(errno)}");
                }
            }
            else
            {
                throw new FuseMountException(Errno.EBUSY,
                    $"{path} is already a mount point ({existing.FileSystemType} from {existing.Source}): unmount it first or choose another directory");
            }
        }

        var probe = LibC.ProbeErrno(path);
        if (probe == Errno.ENOENT)
        {
            throw new FuseMountException(Errno.ENOENT, $"{path} does not exist: create the directory first");
        }

        if (probe != 0)
        {
            throw new FuseMountException(probe, $"cannot use {path}: {Errno.Describe(probe)}");
        }

        if (!Directory.Exists(path))
        {
            throw new FuseMountException(Errno.ENOTDIR, $"{path} is not a directory");
        }
    }

    private static (FuseDevice Fuse, FuseMounter Mounter) MountKernel(string path, BlockDeviceFile file, FuseMountOptions options, BlockDevice device)
    {
        var fsName = SanitizeFsName(options.FsName ?? $"spindle:{device.Description}");
        var mounter = options.Mounter;
        if (mounter == FuseMounter.Auto)
        {
            mounter = LibC.GetEffectiveUserId() == 0 ? FuseMounter.Syscall : FuseMounter.Fusermount;
        }

        var common = new StringBuilder("default_permissions");
        common.Append(CultureInfo.InvariantCulture, $",max_read={options.MaxTransfer}");
        if (options.AllowOther)
        {
            common.Append(",allow_other");
        }

        if (mounter == FuseMounter.Syscall)
        {
            var fuse = FuseDevice.Open();
            var data = string.Create(CultureInfo.InvariantCulture,
                $"fd={fuse.Descriptor},rootmode=40000,user_id={LibC.GetEffectiveUserId()},group_id={LibC.GetEffectiveGroupId()},{common}");
            var flags = LibC.MsNoSuid | LibC.MsNoDev | (file.ReadOnly ? LibC.MsRdOnly : 0);
            if (LibC.Mount(fsName, path, MountTable.FileSystemType, flags, data) == 0)
            {
                return (fuse, FuseMounter.Syscall);
            }

            var errno = Marshal.GetLastPInvokeError();
            fuse.Dispose();
            if (errno != Errno.EPERM || options.Mounter == FuseMounter.Syscall)
            {
                throw new FuseMountException(errno, $"cannot mount on {path}: {Errno.Describe(errno)}");
            }
        }

        var fuseOptions = $"{(file.ReadOnly ? "ro" : "rw")},nosuid,nodev,fsname={fsName},subtype=spindle,{common}";
        var fd = Fusermount.Mount(path, fuseOptions);
        return (FuseDevice.Adopt(fd), FuseMounter.Fusermount);
    }

    /// <summary>The source field may not hold separators or spaces (mount options are comma-separated).</summary>
    private static string SanitizeFsName(string name)
    {
        var builder = new StringBuilder(Math.Min(name.Length, 100));
        foreach (var character in name)
        {
            if (builder.Length >= 100)
            {
                break;
            }

            builder.Append(char.IsAsciiLetterOrDigit(character) || character is '.' or '_' or '-' or ':' or '/' or '@' or '+' ? character : '_');
        }

        return builder.ToString();
    }
}
