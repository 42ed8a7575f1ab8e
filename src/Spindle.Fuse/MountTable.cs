using System.Text;
using Spindle.Fuse.Native;
using Spindle.Protocol;

namespace Spindle.Fuse;

/// <summary>One line of /proc/self/mountinfo.</summary>
/// <param name="MountId">The mount's id.</param>
/// <param name="Device">The superblock's device number as "major:minor"; for FUSE the minor is the connection id under /sys/fs/fuse/connections.</param>
/// <param name="MountPoint">Where it is mounted (escapes decoded).</param>
/// <param name="FileSystemType">fuse.spindle for Spindle's mounts.</param>
/// <param name="Source">The source field (Spindle writes spindle:DESCRIPTION).</param>
public sealed record MountEntry(int MountId, string Device, string MountPoint, string FileSystemType, string Source)
{
    /// <summary>Whether this is a FUSE mount made by Spindle.</summary>
    public bool IsSpindle => FileSystemType == MountTable.FileSystemType;

    public bool IsFuse => FileSystemType == "fuse" || FileSystemType.StartsWith("fuse.", StringComparison.Ordinal);

    /// <summary>The FUSE connection id (the device minor number).</summary>
    public int? ConnectionId => int.TryParse(Device.AsSpan(Device.IndexOf(':') + 1), out var minor) ? minor : null;
}

/// <summary>What is mounted where: reads /proc/self/mountinfo, tells live FUSE mounts from stale ones, unmounts.</summary>
public static class MountTable
{
    /// <summary>The file system type Spindle mounts with (fuse with the subtype spindle).</summary>
    public const string FileSystemType = "fuse.spindle";

    private const string MountInfoPath = "/proc/self/mountinfo";

    /// <summary>Every mount in this process's namespace.</summary>
    public static IReadOnlyList<MountEntry> Read()
    {
        var entries = new List<MountEntry>();
        foreach (var line in File.ReadLines(MountInfoPath))
        {
            if (TryParse(line, out var entry))
            {
                entries.Add(entry);
            }
        }

        return entries;
    }

    /// <summary>The topmost mount at <paramref name="mountPoint"/> (an absolute path), or null.</summary>
    public static MountEntry? Find(string mountPoint)
    {
        var path = Normalize(mountPoint);
        MountEntry? found = null;
        foreach (var entry in Read())
        {
            if (entry.MountPoint == path)
            {
                // Later lines are mounted on top of earlier ones.
                found = entry;
            }
        }

        return found;
    }

    /// <summary>
    /// Whether the FUSE mount at <paramref name="mountPoint"/> has lost its server: the kernel then answers every
    /// request with ENOTCONN. Asks the server (a forced stat), waiting at most <paramref name="timeout"/> (default
    /// 5 s) for a live but slow one, which is not stale. Only meaningful for a path <see cref="Find"/> reports as FUSE.
    /// </summary>
    public static bool IsStale(string mountPoint, TimeSpan? timeout = null)
    {
        var path = Normalize(mountPoint);
        var errno = -1;
        var probe = new Thread(() => Volatile.Write(ref errno, LibC.StatForceSyncErrno(path)))
        {
            IsBackground = true,
            Name = "spindle-stale-probe",
        };
        probe.Start();

        // A server that does not answer leaves the probing thread waiting in the kernel; it is a background thread.
        return probe.Join(timeout ?? TimeSpan.FromSeconds(5)) && Volatile.Read(ref errno) == Errno.ENOTCONN;
    }

    /// <summary>
    /// Unmounts <paramref name="mountPoint"/>: umount2 when allowed (root), else fusermount3 -u. With
    /// <paramref name="lazy"/> the mount is detached at once even if busy (umount -l), and goes away when its last
    /// user closes it. Returns 0 or the errno (EBUSY: in use; EINVAL: not a mount point).
    /// </summary>
    public static int Unmount(string mountPoint, bool lazy)
    {
        var path = Normalize(mountPoint);
        if (LibC.Unmount(path, lazy ? LibC.MntDetach : 0) == 0)
        {
            return 0;
        }

        var errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
        if (errno != Errno.EPERM)
        {
            return errno;
        }

        // Not root: fusermount3 (setuid) unmounts FUSE mounts that this user made.
        return Fusermount.Unmount(path, lazy);
    }

    /// <summary>
    /// Aborts a FUSE connection through fusectl (/sys/fs/fuse/connections/ID/abort): every request waiting on it
    /// fails and the server's reads end. Mounts fusectl if needed and allowed. Returns whether it was aborted.
    /// </summary>
    public static bool AbortConnection(int connectionId)
    {
        const string connections = "/sys/fs/fuse/connections";
        var abort = Path.Combine(connections, connectionId.ToString(System.Globalization.CultureInfo.InvariantCulture), "abort");
        if (!File.Exists(abort) && Directory.Exists(connections) && !Directory.EnumerateFileSystemEntries(connections).Any())
        {
            _ = LibC.Mount("fusectl", connections, "fusectl", 0, string.Empty);
        }

        try
        {
            File.WriteAllText(abort, "1");
            return true;
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    internal static bool TryParse(string line, out MountEntry entry)
    {
        entry = null!;

        // 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        var fields = line.Split(' ');
        var separator = fields.Length < 10 ? -1 : Array.IndexOf(fields, "-", 6);
        if (separator < 0 || separator + 2 >= fields.Length ||
            !int.TryParse(fields[0], out var mountId))
        {
            return false;
        }

        entry = new MountEntry(mountId, fields[2], Unescape(fields[4]), fields[separator + 1], Unescape(fields[separator + 2]));
        return true;
    }

    /// <summary>Decodes the octal escapes (\040 for a space, \011, \012, \134) the kernel writes in paths.</summary>
    internal static string Unescape(string field)
    {
        if (!field.Contains('\\', StringComparison.Ordinal))
        {
            return field;
        }

        var bytes = new List<byte>(field.Length);
        var raw = Encoding.UTF8.GetBytes(field);
        for (var i = 0; i < raw.Length; i++)
        {
            if (raw[i] == '\\' && i + 3 < raw.Length && IsOctal(raw[i + 1]) && IsOctal(raw[i + 2]) && IsOctal(raw[i + 3]))
            {
                bytes.Add((byte)(((raw[i + 1] - '0') << 6) | ((raw[i + 2] - '0') << 3) | (raw[i + 3] - '0')));
                i += 3;
            }
            else
            {
                bytes.Add(raw[i]);
            }
        }

        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    /// <summary>The absolute form of <paramref name="path"/> as mountinfo writes it (no trailing slash).</summary>
    public static string Normalize(string path)
    {
        var full = Path.GetFullPath(path);
        return full.Length > 1 ? full.TrimEnd('/') : full;
    }

    private static bool IsOctal(byte value) => value is >= (byte)'0' and <= (byte)'7';
}
