using System.Globalization;
using System.Runtime.InteropServices;
using Spindle.Cli.Hosting.Native;

namespace Spindle.Cli.Hosting;

/// <summary>
/// nbd-server's <c>user</c> and <c>group</c>: once the sockets are bound and the exports opened, the server gives up
/// root for good: supplementary groups cleared (setgroups), then the group (setgid), then the user (setuid), in that
/// order because only root may change groups. glibc applies each change to every thread of the process. If any step
/// fails, or root could be regained afterwards, the server refuses to run rather than run with more rights than
/// configured.
/// </summary>
internal sealed record PrivilegeDrop(string UserName, uint Uid, string GroupName, uint Gid)
{
    /// <summary>Looks the names (or numbers) up now, so a typo fails at start, before anything is served.</summary>
    /// <param name="user">A user name or number; null keeps the user (and then <paramref name="group"/> alone is set).</param>
    /// <param name="group">A group name or number; null: the user's primary group.</param>
    /// <param name="where">The file and line (or option) that named them, for the error message.</param>
    public static PrivilegeDrop? Resolve(string? user, string? group, string where)
    {
        if (user is null && group is null)
        {
            return null;
        }

        uint uid;
        uint? primaryGid = null;
        string userName;
        if (user is null)
        {
            uid = Posix.geteuid();
            userName = uid.ToString(CultureInfo.InvariantCulture);
        }
        else if (uint.TryParse(user, NumberStyles.None, CultureInfo.InvariantCulture, out uid))
        {
            userName = user;
            var entry = Posix.getpwuid(uid);
            if (entry != IntPtr.Zero)
            {
                primaryGid = (uint)Marshal.ReadInt32(entry, 2 * IntPtr.Size + 4);
            }
        }
        else
        {
            var entry = Posix.getpwnam(user);
            if (entry == IntPtr.Zero)
            {
                throw new ConfigurationException($"{where}: user '{user}' does not exist");
            }

            // struct passwd { char *pw_name; char *pw_passwd; uid_t pw_uid; gid_t pw_gid; ... }
            uid = (uint)Marshal.ReadInt32(entry, 2 * IntPtr.Size);
            primaryGid = (uint)Marshal.ReadInt32(entry, 2 * IntPtr.Size + 4);
            userName = user;
        }

        uint gid;
        string groupName;
        if (group is null)
        {
            gid = primaryGid ?? Posix.getegid();
            groupName = gid.ToString(CultureInfo.InvariantCulture);
        }
        else if (uint.TryParse(group, NumberStyles.None, CultureInfo.InvariantCulture, out gid))
        {
            groupName = group;
        }
        else
        {
            var entry = Posix.getgrnam(group);
            if (entry == IntPtr.Zero)
            {
                throw new ConfigurationException($"{where}: group '{group}' does not exist");
            }

            // struct group { char *gr_name; char *gr_passwd; gid_t gr_gid; char **gr_mem; }
            gid = (uint)Marshal.ReadInt32(entry, 2 * IntPtr.Size);
            groupName = group;
        }

        return new PrivilegeDrop(userName, uid, groupName, gid);
    }

    /// <summary>Whether the process already runs as exactly this user and group (nothing to drop).</summary>
    public bool IsCurrent => Posix.getuid() == Uid && Posix.geteuid() == Uid && Posix.getgid() == Gid && Posix.getegid() == Gid;

    /// <summary>Drops to the user and group, or throws: never returns with rights it should not have.</summary>
    public void Apply()
    {
        if (IsCurrent && Posix.getgroups(0, IntPtr.Zero) == 0)
        {
            return;
        }

        if (Posix.geteuid() != 0)
        {
            throw new InvalidOperationException($"cannot switch to user {UserName} and group {GroupName}: only root can, and this process runs as uid {Posix.geteuid()}");
        }

        if (Posix.setgroups(0, IntPtr.Zero) != 0)
        {
            throw new InvalidOperationException($"setgroups: cannot clear the supplementary groups: {Posix.LastError()}");
        }

        if (Posix.setgid(Gid) != 0)
        {
            throw new InvalidOperationException($"setgid({Gid}) for group {GroupName}: {Posix.LastError()}");
        }

        if (Posix.setuid(Uid) != 0)
        {
            throw new InvalidOperationException($"setuid({Uid}) for user {UserName}: {Posix.LastError()}");
        }

        // Check rather than trust: every id is the new one, no group is left over, and root cannot come back.
        if (!IsCurrent || Posix.getgroups(0, IntPtr.Zero) != 0)
        {
            throw new InvalidOperationException($"after dropping to {UserName}:{GroupName} the process still has other ids (uid {Posix.getuid()}/{Posix.geteuid()}, gid {Posix.getgid()}/{Posix.getegid()})");
        }

        if (Uid != 0 && Posix.setuid(0) == 0)
        {
            throw new InvalidOperationException("root privileges could be regained after dropping them");
        }
    }

    public override string ToString() => $"{UserName} (uid {Uid}), group {GroupName} (gid {Gid})";
}
