namespace Spindle.Fuse;

/// <summary>How the mount is made.</summary>
public enum FuseMounter
{
    /// <summary>mount(2) when running as root, fusermount3 otherwise (or when mount(2) is refused).</summary>
    Auto,

    /// <summary>The mount(2) system call (needs CAP_SYS_ADMIN).</summary>
    Syscall,

    /// <summary>The setuid fusermount3 helper, which passes the /dev/fuse descriptor back over a socket.</summary>
    Fusermount,
}

/// <summary>Options of <see cref="FuseMount"/>.</summary>
public sealed class FuseMountOptions
{
    /// <summary>The largest request the kernel may send (max_write and max_read). Clamped to 64 KiB..16 MiB.</summary>
    public const int DefaultMaxTransfer = 1024 * 1024;

    /// <summary>The name of the file inside the mount point that exposes the device.</summary>
    /// <remarks>Default: <c>disk</c>.</remarks>
    public string FileName { get; set; } = "disk";

    /// <summary>Expose the device read-only (the mount is read-only: writes fail with EROFS).</summary>
    /// <remarks>Default: false; a device without <see cref="Storage.BlockDeviceFeatures.Write"/> is always read-only.</remarks>
    public bool ReadOnly { get; set; }

    /// <summary>Let other users than the one mounting reach the file (allow_other; file permissions still apply).</summary>
    /// <remarks>Default: false. Without root, /etc/fuse.conf must contain user_allow_other.</remarks>
    public bool AllowOther { get; set; }

    /// <summary>Owner of the file and directory. Default: the effective user.</summary>
    public uint? Uid { get; set; }

    /// <summary>Group of the file and directory. Default: the effective group.</summary>
    public uint? Gid { get; set; }

    /// <summary>Permission bits of the file. Default: 0600 (0400 when read-only).</summary>
    public UnixFileMode? FileMode { get; set; }

    /// <summary>
    /// Go through the kernel's page cache (readahead, cached reads; writes still reach the device before write()
    /// returns). Default: false: every read and write of the file reaches the device (FOPEN_DIRECT_IO), as with a
    /// block device, and a loop device on top does the caching.
    /// </summary>
    public bool PageCache { get; set; }

    /// <summary>The largest single read or write request, in bytes (max_read/max_write; the kernel caps it by its max_pages limit).</summary>
    /// <remarks>Default: 1 MiB.</remarks>
    public int MaxTransfer { get; set; } = DefaultMaxTransfer;

    /// <summary>Asynchronous requests (readahead, direct I/O from a loop device) the kernel keeps in flight (max_background).</summary>
    /// <remarks>Default: 64.</remarks>
    public int MaxBackground { get; set; } = 64;

    /// <summary>Threads always waiting for requests. Default: 2.</summary>
    public int MinThreads { get; set; } = 2;

    /// <summary>
    /// Most threads reading requests. A thread that picks up a request while no other is waiting starts another,
    /// so a backend call that blocks never stalls other requests; idle threads beyond <see cref="MinThreads"/> + 2 exit.
    /// </summary>
    /// <remarks>Default: 32.</remarks>
    public int MaxThreads { get; set; } = 32;

    /// <summary>Most requests being served at once (each holds one request buffer of <see cref="MaxTransfer"/> + 4 KiB).</summary>
    /// <remarks>Default: 128.</remarks>
    public int MaxInFlight { get; set; } = 128;

    /// <summary>How the mount is made. Default: <see cref="FuseMounter.Auto"/>.</summary>
    public FuseMounter Mounter { get; set; } = FuseMounter.Auto;

    /// <summary>
    /// Replace a stale Spindle mount (one whose server died: every access fails with ENOTCONN) found on the mount
    /// point, by detaching it first. Default: true. Stale mounts of other file systems are never touched.
    /// </summary>
    public bool RecoverStaleMount { get; set; } = true;

    /// <summary>How long the kernel may take to send INIT after the mount. Default: 10 s.</summary>
    public TimeSpan InitTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>How long disposing waits for a busy mount to be released before aborting the connection. Default: 10 s.</summary>
    public TimeSpan UnmountTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>The source field shown by mount and /proc/mounts. Default: spindle:DESCRIPTION of the device.</summary>
    public string? FsName { get; set; }

    internal FuseMountOptions Validated()
    {
        ArgumentException.ThrowIfNullOrEmpty(FileName);
        if (FileName is "." or ".." || FileName.Contains('/', StringComparison.Ordinal) || FileName.Contains('\0', StringComparison.Ordinal) ||
            System.Text.Encoding.UTF8.GetByteCount(FileName) > 255)
        {
            throw new ArgumentException($"'{FileName}' is not a valid file name", nameof(FileName));
        }

        ArgumentOutOfRangeException.ThrowIfLessThan(MinThreads, 1, nameof(MinThreads));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxThreads, MinThreads, nameof(MaxThreads));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxInFlight, MaxThreads, nameof(MaxInFlight));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxBackground, 1, nameof(MaxBackground));
        ArgumentOutOfRangeException.ThrowIfGreaterThan(MaxBackground, ushort.MaxValue, nameof(MaxBackground));
        var copy = (FuseMountOptions)MemberwiseClone();
        copy.MaxTransfer = Math.Clamp(MaxTransfer, 64 * 1024, 16 * 1024 * 1024) & ~4095;
        return copy;
    }
}
