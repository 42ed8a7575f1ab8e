using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;
using Spindle.Cli.Hosting;
using Spindle.Fuse;
using Spindle.Fuse.Devices;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle detach /dev/loopN|NAME|DIR</c>: undoes <c>spindle attach</c> (loop device, mount, server, files), or
/// unmounts a <c>spindle mount</c> directory. Safe to repeat, and cleans up after a server that died.
/// </summary>
internal static class DetachCommand
{
    private const string Examples = """
        Undo spindle attach: release the loop device, unmount /run/spindle/mnt/NAME (the mount server flushes the
        device and exits), remove the directory and the state files. Refuses while a file system is mounted on
        the loop device. Also cleans up after a server that died (a stale mount, a leftover loop device).

        Given a directory where spindle mount runs, unmounts it (that process then flushes and exits); a stale
        mount left by a crash is removed.

        Examples:
          spindle detach /dev/loop3
          spindle detach scratch
          spindle detach /mnt/d
        """;

    /// <summary>EBUSY: unmount refused because the mount is in use.</summary>
    private const int Busy = 16;

    private static readonly TimeSpan ServerExitTimeout = TimeSpan.FromSeconds(30);

    public static Command Create()
    {
        var target = new Argument<string>("target") { Description = "The loop device (/dev/loopN), the attachment name, or a mount directory." };
        var timeout = new Option<double?>("--timeout") { Description = "Seconds to wait for the loop device to be released [default: 10]." };
        var command = new Command("detach", Examples) { target, timeout };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var wait = TimeSpan.FromSeconds(parse.GetValue(timeout) ?? 10);
            try
            {
                return await DetachAsync(parse.GetValue(target)!, wait, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception exception) when (exception is LoopDeviceException or FuseMountException or IOException or UnauthorizedAccessException)
            {
                return CliErrors.Fail(exception.Message);
            }
        });
        return command;
    }

    private static async Task<int> DetachAsync(string target, TimeSpan wait, CancellationToken cancellationToken)
    {
        string? name = null;
        if (target.StartsWith("/dev/", StringComparison.Ordinal))
        {
            name = AttachState.LoadAll().FirstOrDefault(state => state.LoopDevice == target || state.NbdDevice == target)?.Name;
            if (name is null && LoopDevice.Query(target) is { } bound)
            {
                name = AttachPaths.NameOfMountPath(bound.BackingFile);
            }

            if (name is null)
            {
                return CliErrors.Fail($"{target} was not attached by spindle{(LoopDevice.Query(target) is { } other ? $" (it is bound to {other.BackingFile})" : string.Empty)}");
            }
        }
        else if (target.Contains('/', StringComparison.Ordinal))
        {
            var path = MountTable.Normalize(target);
            name = AttachPaths.NameOfMountPath(path);
            if (name is null)
            {
                return UnmountDirectory(path);
            }
        }
        else if (AttachPaths.IsValidName(target))
        {
            name = target;
        }
        else
        {
            return CliErrors.Usage($"'{target}' is neither a loop device, an attachment name nor a directory");
        }

        var state = AttachState.Load(name);
        if (state is null && !Directory.Exists(AttachPaths.MountPoint(name)) && MountTable.Find(AttachPaths.MountPoint(name)) is null)
        {
            return CliErrors.Fail($"nothing named '{name}' is attached (see {AttachPaths.Root})");
        }

        if (!DaemonProcess.IsRoot)
        {
            return CliErrors.Fail("spindle detach needs root (only root may release loop devices)");
        }

        await DetachAttachmentAsync(name, state, wait, Console.Error, cancellationToken).ConfigureAwait(false);
        Console.Error.WriteLine($"spindle: detached {name}{(state?.Device is { } device ? $" ({device})" : string.Empty)}");
        return 0;
    }

    /// <summary>
    /// Removes everything of attachment <paramref name="name"/>, in the order that loses nothing: the loop device
    /// (refused while in use), the mount (refused while its file is open), then the server, which flushes the
    /// device and exits once unmounted, then the directory and files. Each step is skipped when already done.
    /// </summary>
    /// <exception cref="LoopDeviceException">The loop device is in use.</exception>
    /// <exception cref="FuseMountException">The file is open by a process.</exception>
    public static async Task DetachAttachmentAsync(string name, AttachState? state, TimeSpan wait, TextWriter log, CancellationToken cancellationToken)
    {
        if (state?.NbdDevice is not null)
        {
            await DetachKernelAsync(name, state, log, cancellationToken).ConfigureAwait(false);
            return;
        }

        var mountPoint = state?.MountPoint ?? AttachPaths.MountPoint(name);
        var prefix = mountPoint.TrimEnd('/') + "/";

        // 1. Every loop device reading a file under the mount point (normally the one in the state), and the
        // stable-name links to it (gone before the device number can be reused by another attachment).
        var released = new HashSet<string>(StringComparer.Ordinal);
        foreach (var loop in LoopDevice.List().Where(device => device.BackingFile.StartsWith(prefix, StringComparison.Ordinal)))
        {
            await LoopDevice.DetachAsync(loop.Device, wait, cancellationToken).ConfigureAwait(false);
            released.Add(loop.Device);
        }

        // The recorded device too: its server may have released it already and left the links behind.
        if (state?.LoopDevice is { } recorded)
        {
            released.Add(recorded);
        }

        foreach (var device in released)
        {
            AttachLinks.RemoveAllTo(device);
        }

        // 2. The mount. A live server sees its connection end, flushes the device and exits; a dead one left a
        // stale mount (ENOTCONN), which can only be detached.
        var serverAlive = state is not null && state.Pid != Environment.ProcessId && state.IsOwnerAlive();
        if (MountTable.Find(mountPoint) is { } entry)
        {
            var stale = entry.IsFuse && MountTable.IsStale(mountPoint);
            var errno = MountTable.Unmount(mountPoint, lazy: stale);
            if (errno == Busy)
            {
                throw new FuseMountException(errno, $"{mountPoint}/{Path.GetFileName(state?.File ?? "disk")} is open by a process (see: fuser -m {mountPoint}); close it first");
            }

            if (errno != 0 && MountTable.Find(mountPoint) is not null)
            {
                throw new FuseMountException(errno, $"cannot unmount {mountPoint}: {Marshal.GetPInvokeErrorMessage(errno)}");
            }
        }

        // 3. The server: it exits by itself once unmounted; a stuck one is stopped.
        if (serverAlive && state is not null)
        {
            if (!await WaitForExitAsync(state.Pid, ServerExitTimeout, cancellationToken).ConfigureAwait(false))
            {
                log.WriteLine($"spindle: the mount server {state.Pid} did not exit; stopping it");
                DaemonProcess.Signal(state.Pid, DaemonProcess.SigTerm);
                if (!await WaitForExitAsync(state.Pid, TimeSpan.FromSeconds(10), cancellationToken).ConfigureAwait(false))
                {
                    DaemonProcess.Signal(state.Pid, DaemonProcess.SigKill);
                    await WaitForExitAsync(state.Pid, TimeSpan.FromSeconds(5), cancellationToken).ConfigureAwait(false);
                }
            }
        }

        // 4. What is left on disk.
        if (Directory.Exists(mountPoint) && MountTable.Find(mountPoint) is null)
        {
            Directory.Delete(mountPoint);
        }

        File.Delete(AttachPaths.State(name));
        File.Delete(AttachPaths.Log(name));
    }

    /// <summary>
    /// Detaches an nbd attachment: refused while the device is held (mounted, swap); else the background process
    /// disconnects it and exits on SIGTERM, and a device whose process is gone is disconnected here.
    /// </summary>
    private static async Task DetachKernelAsync(string name, AttachState state, TextWriter log, CancellationToken cancellationToken)
    {
        var device = state.NbdDevice!;
        var index = Devices.Nbd.NbdDriver.ParseDevice(device);
        using var driver = Devices.Nbd.NbdDriver.TryOpen(out _);
        var connected = index is { } number && driver is not null && driver.IsConnected(number);
        if (connected && Devices.Native.DeviceUse.IsHeldExclusively(device))
        {
            throw new IOException($"{device} is in use (a mounted file system, swap: see findmnt {device}, swapon); unmount it first");
        }

        if (state.Pid != Environment.ProcessId && state.IsOwnerAlive())
        {
            DaemonProcess.Signal(state.Pid, DaemonProcess.SigTerm);
            if (!await WaitForExitAsync(state.Pid, ServerExitTimeout, cancellationToken).ConfigureAwait(false))
            {
                log.WriteLine($"spindle: the attach process {state.Pid} did not exit; stopping it");
                DaemonProcess.Signal(state.Pid, DaemonProcess.SigKill);
                await WaitForExitAsync(state.Pid, TimeSpan.FromSeconds(5), cancellationToken).ConfigureAwait(false);
            }
        }

        if (index is { } left && driver is not null && driver.IsConnected(left))
        {
            driver.Disconnect(left);
        }

        AttachLinks.RemoveAllTo(device);
        File.Delete(AttachPaths.State(name));
        File.Delete(AttachPaths.Log(name));
    }

    /// <summary>Unmounts a directory where <c>spindle mount</c> runs (or ran: a stale mount is detached).</summary>
    private static int UnmountDirectory(string path)
    {
        var entry = MountTable.Find(path);
        if (entry is null)
        {
            return CliErrors.Fail($"{path} is not a mount point");
        }

        if (!entry.IsSpindle)
        {
            return CliErrors.Fail($"{path} is not a spindle mount ({entry.FileSystemType}); use umount");
        }

        var stale = MountTable.IsStale(path);
        var errno = MountTable.Unmount(path, lazy: stale);
        if (errno != 0)
        {
            return CliErrors.Fail(errno == Busy
                ? $"{path} is in use (a loop device bound to its file, or an open file: see losetup -a, fuser -m {path})"
                : $"cannot unmount {path}: {Marshal.GetPInvokeErrorMessage(errno)}");
        }

        Console.Error.WriteLine(stale ? $"spindle: removed the stale mount on {path}" : $"spindle: unmounted {path}");
        return 0;
    }

    private static async Task<bool> WaitForExitAsync(int pid, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var watch = Stopwatch.StartNew();
        while (DaemonProcess.IsAlive(pid))
        {
            if (watch.Elapsed > timeout)
            {
                return false;
            }

            await Task.Delay(50, cancellationToken).ConfigureAwait(false);
        }

        return true;
    }
}
