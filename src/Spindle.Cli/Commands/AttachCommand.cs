using System.CommandLine;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Spindle.Cli.Hosting;
using Spindle.Client;
using Spindle.Fuse;
using Spindle.Fuse.Devices;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle attach SOURCE</c>: mounts SOURCE in a background server (RUN/mnt/NAME/disk), binds a loop device to
/// the file, prints /dev/loopN. The same command, with the hidden --serve-daemon, is that background server.
/// </summary>
internal static partial class AttachCommand
{
    private const string DaemonFlag = "--serve-daemon";

    private const string Examples = """
        Make SOURCE a local block device: a background server mounts it as /run/spindle/mnt/NAME/disk (as
        spindle mount does) and a loop device is bound to that file (direct I/O, many requests in flight).
        Prints the loop device, e.g. /dev/loop3. Needs root. Undo with: spindle detach NAME (or /dev/loopN).

        SOURCE is a file, a block device, memory:SIZE, or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbds://...,
        nbd+unix:///EXPORT?socket=PATH). An NBD export keeps working across server restarts and network cuts:
        I/O waits while the client reconnects, then resumes; nothing fails before --dead-timeout (default 300 s,
        'never' for a hard mount). --path adds servers of the same export (multipath). An export with stable
        names also gets links: /run/spindle/by-uuid/UUID, by-label/LABEL, by-serial/SERIAL -> /dev/loopN.

        Examples:
          dev=$(spindle attach disk.img)           then: mkfs.ext4 $dev; mount $dev /mnt
          spindle attach --name scratch memory:4G  /run/spindle/mnt/scratch/disk on a loop device
          spindle attach -r golden.img             read-only
          spindle attach nbd://server/disk         a remote export (ask by name or by-uuid/UUID)
          spindle attach --dead-timeout never nbd://a/disk --path nbd://b/disk   two servers, never fail

        The server logs to /run/spindle/NAME.log and records its state in /run/spindle/NAME.json.
        """;

    public static Command Create()
    {
        var source = new Argument<string?>("source") { Description = "A file, a block device, memory:SIZE, or an NBD URI.", Arity = ArgumentArity.ZeroOrOne };
        var name = new Option<string?>("--name", "-n") { Description = "Name of the attachment [default: from SOURCE, e.g. disk for disk.img]." };
        var timeout = new Option<double?>("--timeout") { Description = "Seconds to wait for the device to be ready [default: 60]." };
        var daemon = new Option<bool>(DaemonFlag) { Hidden = true };
        var options = new MountCommandOptions();
        var kernel = new AttachKernelOptions();
        var command = new Command("attach", Examples) { source, name, timeout, daemon };
        options.AddTo(command);
        kernel.AddTo(command);

        command.SetAction(async (parse, cancellationToken) =>
        {
            if (!options.TryGetLogLevel(parse, out var level, out var error))
            {
                return CliErrors.Usage(error);
            }

            FuseMountOptions mountOptions;
            MountSourceOptions sourceOptions;
            try
            {
                (mountOptions, sourceOptions) = options.Build(parse);
            }
            catch (ConfigurationException exception)
            {
                return CliErrors.Usage(exception.Message);
            }

            var adopt = parse.GetValue(kernel.Adopt);
            var wait = TimeSpan.FromSeconds(parse.GetValue(timeout) ?? 60);
            if (adopt is not null && !parse.GetValue(daemon))
            {
                return await AdoptAsync(adopt, parse.GetValue(source), parse.GetValue(name), wait, cancellationToken).ConfigureAwait(false);
            }

            if (parse.GetValue(source) is not { } sourceText)
            {
                return CliErrors.Usage("SOURCE is missing (only --adopt may leave it out)");
            }

            var attachmentName = parse.GetValue(name) ?? MountSource.SuggestName(sourceText);
            if (!AttachPaths.IsValidName(attachmentName))
            {
                return CliErrors.Usage($"--name '{attachmentName}': use letters, digits, '.', '_' and '-' (at most 64, not starting with '.')");
            }

            if (parse.GetValue(daemon))
            {
                if (parse.GetValue(kernel.Device) == AttachKernelOptions.Nbd)
                {
                    var arguments = parse.Tokens.Select(token => token.Value).ToList();
                    return await AttachKernelDaemon.RunDaemonAsync(attachmentName, sourceText, sourceOptions, kernel, parse, adopt, level, arguments).ConfigureAwait(false);
                }

                return await RunServerAsync(attachmentName, sourceText, sourceOptions, mountOptions, level).ConfigureAwait(false);
            }

            var kind = kernel.ChooseKind(parse, out var kindError);
            if (kind is null)
            {
                return CliErrors.Usage(kindError!);
            }

            var serverArguments = new List<string> { "attach", AbsoluteSource(sourceText), "--name", attachmentName };
            serverArguments.AddRange(options.ToArguments(parse));
            serverArguments.AddRange(kernel.ToArguments(parse, kind));
            serverArguments.Add(DaemonFlag);
            return await StartAsync(attachmentName, serverArguments, wait, adopting: false, cancellationToken).ConfigureAwait(false);
        });
        return command;
    }

    /// <summary>The attaching command: reserves the name, starts the server, waits until its device is ready.</summary>
    private static async Task<int> StartAsync(string name, IReadOnlyList<string> serverArguments, TimeSpan wait, bool adopting, CancellationToken cancellationToken)
    {
        if (!DaemonProcess.IsRoot)
        {
            return CliErrors.Fail("spindle attach needs root (only root may bind loop devices); spindle mount works without");
        }

        try
        {
            Directory.CreateDirectory(AttachPaths.MountRoot);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return CliErrors.Fail($"cannot create {AttachPaths.MountRoot}: {exception.Message}");
        }

        for (var attempt = 0; !adopting && !AttachState.TryReserve(name, Environment.ProcessId); attempt++)
        {
            var existing = AttachState.Load(name);
            if (existing is not null && existing.IsOwnerAlive())
            {
                return CliErrors.Fail($"'{name}' is already attached{(existing.Device is { } device ? $" as {device}" : string.Empty)}: spindle detach {name} first, or choose another --name");
            }

            if (attempt > 0)
            {
                return CliErrors.Fail($"cannot reserve the name '{name}' ({AttachPaths.State(name)})");
            }

            // Left behind by a server that died: clean it up (loop device, stale mount, files) and retry.
            try
            {
                await DetachCommand.DetachAttachmentAsync(name, existing, TimeSpan.FromSeconds(30), Console.Error, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception exception) when (exception is LoopDeviceException or FuseMountException or IOException)
            {
                return CliErrors.Fail($"a stale attachment named '{name}' could not be removed: {exception.Message}{(existing?.NbdDevice is { } nbd ? $" (spindle attach --adopt {nbd} watches it again)" : string.Empty)}");
            }
        }

        Process server;
        try
        {
            server = StartServer(name, serverArguments);
        }
        catch (Exception exception) when (exception is IOException or System.ComponentModel.Win32Exception or InvalidOperationException)
        {
            File.Delete(AttachPaths.State(name));
            return CliErrors.Fail($"cannot start the mount server: {exception.Message}");
        }

        using (server)
        {
            var watch = Stopwatch.StartNew();
            while (true)
            {
                var state = AttachState.Load(name);
                if (state is { Phase: AttachState.Ready, Device: { } device } && state.Pid == server.Id)
                {
                    Console.Out.WriteLine(device);
                    return 0;
                }

                if (state is { Phase: AttachState.Failed })
                {
                    server.WaitForExit(TimeSpan.FromSeconds(10));
                    if (!adopting)
                    {
                        File.Delete(AttachPaths.State(name));
                    }

                    return CliErrors.Fail(state.Error ?? "the mount server failed");
                }

                if (server.HasExited || watch.Elapsed > wait)
                {
                    var reason = server.HasExited
                        ? $"the mount server exited ({server.ExitCode}) before the device was ready"
                        : $"the device was not ready within {wait.TotalSeconds} s";
                    if (!adopting)
                    {
                        await DetachCommand.DetachAttachmentAsync(name, AttachState.Load(name), TimeSpan.FromSeconds(30), TextWriter.Null, CancellationToken.None).ConfigureAwait(false);
                    }

                    return CliErrors.Fail($"{reason}; its log: {AttachPaths.Log(name)}\n{Tail(AttachPaths.Log(name))}");
                }

                await Task.Delay(100, CancellationToken.None).ConfigureAwait(false);
            }
        }
    }

    /// <summary>
    /// Starts this program again as the mount server, in its own session (the terminal's signals do not reach it),
    /// with standard input from /dev/null and its output appended to RUN/NAME.log.
    /// </summary>
    private static Process StartServer(string name, IReadOnlyList<string> arguments)
    {
        var startInfo = new ProcessStartInfo("/bin/sh")
        {
            UseShellExecute = false,
            WorkingDirectory = "/",
        };
        startInfo.ArgumentList.Add("-c");
        startInfo.ArgumentList.Add("exec \"$0\" \"$@\" </dev/null >>\"$SPINDLE_ATTACH_LOG\" 2>&1");
        var self = Environment.ProcessPath ?? throw new InvalidOperationException("the path of this program is unknown");
        startInfo.ArgumentList.Add(self);
        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
        {
            // Run as "dotnet spindle.dll": the server needs the same assembly, which sits in the application's
            // directory (Assembly.Location would be empty in the single-file and native builds; this branch is
            // never taken there, as the program is its own executable).
            var assembly = typeof(AttachCommand).Assembly.GetName().Name ?? throw new InvalidOperationException("the entry assembly is unknown");
            startInfo.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, assembly + ".dll"));
        }

        foreach (var argument in arguments)
        {
            startInfo.ArgumentList.Add(argument);
        }

        startInfo.Environment["SPINDLE_ATTACH_LOG"] = AttachPaths.Log(name);
        startInfo.Environment["SPINDLE_RUN_DIR"] = AttachPaths.Root;
        return Process.Start(startInfo) ?? throw new InvalidOperationException("the mount server did not start");
    }

    /// <summary>The background mount server: mount, bind the loop device, record the state, serve until stopped.</summary>
    private static async Task<int> RunServerAsync(string name, string source, MountSourceOptions sourceOptions, FuseMountOptions mountOptions, LogLevel level)
    {
        DaemonProcess.StartNewSession();
        using var signals = new MountSignals();
        using var loggerFactory = CliLogging.Create(level);
        var logger = loggerFactory.CreateLogger("Spindle.Attach");
        var state = (AttachState.Load(name) ?? new AttachState { Name = name }) with
        {
            Pid = Environment.ProcessId,
            Source = source,
            Started = DateTimeOffset.UtcNow,
        };
        state.Save();

        BlockDevice device;
        try
        {
            device = await MountSource.OpenAsync(source, sourceOptions with { LoggerFactory = loggerFactory }, CancellationToken.None).ConfigureAwait(false);
        }
        catch (ConfigurationException exception)
        {
            return Failed(state, exception.Message, logger);
        }

        // Hold no directory: the user may unmount wherever this was started from.
        Environment.CurrentDirectory = "/";
        var mountPoint = AttachPaths.MountPoint(name);
        await using (device.ConfigureAwait(false))
        {
            FuseMount mount;
            try
            {
                Directory.CreateDirectory(mountPoint);
                mount = await FuseMount.MountAsync(device, mountPoint, mountOptions, logger).ConfigureAwait(false);
            }
            catch (Exception exception) when (exception is FuseMountException or IOException or UnauthorizedAccessException)
            {
                TryDeleteDirectory(mountPoint);
                return Failed(state, exception.Message, logger);
            }

            string loop;
            try
            {
                loop = await LoopDevice.AttachAsync(mount.FilePath, mount.ReadOnly).ConfigureAwait(false);
            }
            catch (LoopDeviceException exception)
            {
                await mount.DisposeAsync().ConfigureAwait(false);
                TryDeleteDirectory(mountPoint);
                return Failed(state, exception.Message, logger);
            }

            var info = LoopDevice.Query(loop);
            logger.LogInformation("{Loop} is bound to {File} (direct I/O {DirectIo})", loop, mount.FilePath, info?.DirectIo == true ? "on" : "off");
            IReadOnlyList<string> links = [];
            if (device is NbdBlockDevice { Identity: { IsEmpty: false } identity })
            {
                var problems = new List<string>();
                links = AttachLinks.Create(loop, identity.Uuid, identity.Label, identity.Serial, problems);
                foreach (var problem in problems)
                {
                    logger.LogWarning("{Problem}", problem);
                }

                logger.LogInformation("Export {Identity}: {Links}", identity, links.Count == 0 ? "no links" : string.Join(", ", links));
            }

            state = state with
            {
                Phase = AttachState.Ready,
                MountPoint = mountPoint,
                File = mount.FilePath,
                LoopDevice = loop,
                ReadOnly = mount.ReadOnly,
                Links = links,
            };
            state.Save();

            await MountCommand.ServeUntilStoppedAsync(mount, signals, logger, beforeUnmount: async () =>
            {
                // Stopped by a signal rather than by spindle detach: release the loop device if nothing uses it.
                AttachLinks.Remove(links, loop);
                if (LoopDevice.Query(loop) is { } bound && bound.BackingFile == mount.FilePath)
                {
                    try
                    {
                        await LoopDevice.DetachAsync(loop, TimeSpan.FromSeconds(5)).ConfigureAwait(false);
                    }
                    catch (LoopDeviceException exception)
                    {
                        logger.LogWarning("{Message}", exception.Message);
                    }
                }
            }).ConfigureAwait(false);
        }

        if (AttachState.Load(name) is { } current && current.Pid == Environment.ProcessId)
        {
            File.Delete(AttachPaths.State(name));
        }

        TryDeleteDirectory(mountPoint);
        logger.LogInformation("Detached {Name}", name);
        return 0;
    }

    private static int Failed(AttachState state, string error, ILogger logger)
    {
        logger.LogError("{Error}", error);
        (state with { Phase = AttachState.Failed, Error = error }).Save();
        return CliErrors.Failure;
    }

    private static string AbsoluteSource(string source) =>
        source.Contains("://", StringComparison.Ordinal) || source.StartsWith("memory:", StringComparison.OrdinalIgnoreCase)
            ? source
            : Path.GetFullPath(source);

    private static void TryDeleteDirectory(string path)
    {
        try
        {
            if (Directory.Exists(path))
            {
                Directory.Delete(path);
            }
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
        }
    }

    private static string Tail(string path)
    {
        try
        {
            var lines = File.ReadAllLines(path);
            return string.Join('\n', lines.Skip(Math.Max(0, lines.Length - 10)));
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return string.Empty;
        }
    }
}
