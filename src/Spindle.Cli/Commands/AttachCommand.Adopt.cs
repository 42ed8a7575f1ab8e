using Spindle.Cli.Hosting;
using Spindle.Devices.Nbd;
using Spindle.Fuse.Devices;

namespace Spindle.Cli.Commands;

/// <summary><c>spindle attach --adopt /dev/nbdN</c>: a new background process takes over a device the kernel kept.</summary>
internal static partial class AttachCommand
{
    /// <summary>
    /// Starts the background process again for an nbd device whose process died or was restarted: with the arguments
    /// it recorded (the same source, paths and timeouts), or with <paramref name="source"/> (default: the backend
    /// identifier the kernel shows, which is the source the device was attached with).
    /// </summary>
    private static async Task<int> AdoptAsync(string device, string? source, string? name, TimeSpan wait, CancellationToken cancellationToken)
    {
        if (NbdDriver.ParseDevice(device) is not { } index)
        {
            return CliErrors.Usage($"--adopt {device}: not an nbd device (/dev/nbdN)");
        }

        if (!DaemonProcess.IsRoot)
        {
            return CliErrors.Fail("spindle attach --adopt needs root (the nbd driver's netlink commands do)");
        }

        var path = NbdDriver.DevicePath(index);
        var state = AttachState.LoadAll().FirstOrDefault(candidate => candidate.NbdDevice == path);
        if (state is not null && state.IsOwnerAlive())
        {
            return CliErrors.Fail($"{path} is watched by spindle process {state.Pid} ('{state.Name}') already");
        }

        List<string> arguments;
        if (state?.Arguments is { Count: > 0 } recorded && (source is null || source == state.Source))
        {
            name = state.Name;
            arguments = [];
            for (var i = 0; i < recorded.Count; i++)
            {
                if (recorded[i] == "--adopt")
                {
                    i++;
                }
                else if (recorded[i] != DaemonFlag)
                {
                    arguments.Add(recorded[i]);
                }
            }
        }
        else
        {
            source ??= NbdDriver.ReadBackend(index);
            if (source is null)
            {
                return CliErrors.Usage($"{path}: no recorded attachment and no backend identifier; give SOURCE");
            }

            name ??= state?.Name ?? MountSource.SuggestName(source);
            arguments = ["attach", AbsoluteSource(source), "--name", name, "--device", AttachKernelOptions.Nbd];
        }

        arguments.AddRange(["--adopt", path, DaemonFlag]);
        return await StartAsync(name, arguments, wait, adopting: state is not null && state.Name == name, cancellationToken).ConfigureAwait(false);
    }
}
