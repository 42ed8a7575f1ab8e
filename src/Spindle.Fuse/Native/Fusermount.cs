using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using Spindle.Protocol;

namespace Spindle.Fuse.Native;

/// <summary>
/// The setuid fusermount3 helper, for mounting without root: it opens /dev/fuse, mounts it, and sends the
/// descriptor back over the Unix socket named by $_FUSE_COMMFD (SCM_RIGHTS), as libfuse's fuse_mount does.
/// </summary>
internal static unsafe class Fusermount
{
    public const string Program = "fusermount3";

    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    /// <summary>Mounts and returns the /dev/fuse descriptor for the new mount.</summary>
    public static int Mount(string mountPoint, string options)
    {
        var program = Find() ?? throw new FuseMountException(Errno.ENOENT, "fusermount3 is not installed (Debian: apt-get install fuse3)");
        var fds = stackalloc int[2];
        if (LibC.SocketPair(LibC.AfUnix, LibC.SockStream | LibC.SockCloExec, 0, fds) != 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            throw new FuseMountException(errno, $"socketpair failed: {Errno.Describe(errno)}");
        }

        var ours = fds[0];
        var theirs = fds[1];
        try
        {
            // The helper's end must survive exec; ours must not leak into it.
            _ = LibC.Fcntl(theirs, LibC.FSetFd, 0);
            var startInfo = new ProcessStartInfo(program)
            {
                UseShellExecute = false,
                RedirectStandardError = true,
                RedirectStandardOutput = true,
            };
            startInfo.ArgumentList.Add("-o");
            startInfo.ArgumentList.Add(options);
            startInfo.ArgumentList.Add("--");
            startInfo.ArgumentList.Add(mountPoint);
            startInfo.Environment["_FUSE_COMMFD"] = theirs.ToString(CultureInfo.InvariantCulture);

            using var process = Process.Start(startInfo) ?? throw new FuseMountException(Errno.EIO, "fusermount3 did not start");
            _ = LibC.Close(theirs);
            theirs = -1;
            var errorText = process.StandardError.ReadToEndAsync();
            _ = process.StandardOutput.ReadToEndAsync();
            if (!process.WaitForExit(Timeout))
            {
                process.Kill();
                throw new FuseMountException(Errno.ETIMEDOUT, $"fusermount3 did not finish within {Timeout.TotalSeconds} s");
            }

            if (process.ExitCode != 0)
            {
                var message = errorText.Wait(TimeSpan.FromSeconds(5)) ? errorText.Result.Trim() : string.Empty;
                throw new FuseMountException(Errno.EPERM, $"fusermount3 failed: {(message.Length > 0 ? message : $"exit {process.ExitCode}")}");
            }

            var fd = ReceiveDescriptor(ours);
            if (fd < 0)
            {
                throw new FuseMountException(-fd, $"fusermount3 mounted but passed no descriptor ({Errno.Describe(-fd)})");
            }

            return fd;
        }
        finally
        {
            _ = LibC.Close(ours);
            if (theirs >= 0)
            {
                _ = LibC.Close(theirs);
            }
        }
    }

    /// <summary>fusermount3 -u [-z]; returns 0 or an errno.</summary>
    public static int Unmount(string mountPoint, bool lazy)
    {
        var program = Find();
        if (program is null)
        {
            return Errno.EPERM;
        }

        var startInfo = new ProcessStartInfo(program)
        {
            UseShellExecute = false,
            RedirectStandardError = true,
            RedirectStandardOutput = true,
        };
        startInfo.ArgumentList.Add(lazy ? "-uz" : "-u");
        startInfo.ArgumentList.Add("--");
        startInfo.ArgumentList.Add(mountPoint);
        using var process = Process.Start(startInfo);
        if (process is null)
        {
            return Errno.EIO;
        }

        var errorText = process.StandardError.ReadToEndAsync();
        _ = process.StandardOutput.ReadToEndAsync();
        if (!process.WaitForExit(Timeout))
        {
            process.Kill();
            return Errno.ETIMEDOUT;
        }

        if (process.ExitCode == 0)
        {
            return 0;
        }

        var message = errorText.Wait(TimeSpan.FromSeconds(5)) ? errorText.Result : string.Empty;
        return message.Contains("busy", StringComparison.OrdinalIgnoreCase) ? Errno.EBUSY
            : message.Contains("not found", StringComparison.OrdinalIgnoreCase) || message.Contains("not mounted", StringComparison.OrdinalIgnoreCase) ? Errno.EINVAL
            : Errno.EPERM;
    }

    public static string? Find()
    {
        foreach (var directory in new[] { "/usr/bin", "/bin", "/usr/local/bin" })
        {
            var candidate = Path.Combine(directory, Program);
            if (File.Exists(candidate))
            {
                return candidate;
            }
        }

        return null;
    }

    /// <summary>Receives one descriptor (SCM_RIGHTS) from the socket; returns it or -errno.</summary>
    private static int ReceiveDescriptor(int socket)
    {
        const int MsgCmsgCloExec = 0x40000000;
        byte data;
        var control = stackalloc byte[64];
        new Span<byte>(control, 64).Clear();
        var vector = new LibC.IoVector { Base = &data, Length = 1 };
        var message = new LibC.MessageHeader
        {
            Vectors = &vector,
            VectorCount = 1,
            Control = control,
            ControlLength = 64,
        };

        nint received = -1;
        for (var attempt = 0; attempt < 16; attempt++)
        {
            received = LibC.ReceiveMessage(socket, &message, MsgCmsgCloExec);
            if (received >= 0 || Marshal.GetLastPInvokeError() != Errno.EINTR)
            {
                break;
            }
        }

        if (received < 0)
        {
            return -Marshal.GetLastPInvokeError();
        }

        var header = (LibC.ControlMessageHeader*)control;
        if (message.ControlLength < (nuint)sizeof(LibC.ControlMessageHeader) + sizeof(int) ||
            header->Level != LibC.SolSocket || header->Type != LibC.ScmRights)
        {
            return -Errno.EPROTO;
        }

        return *(int*)(control + sizeof(LibC.ControlMessageHeader));
    }
}
