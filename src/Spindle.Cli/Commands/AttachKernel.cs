using System.CommandLine;
using System.Globalization;
using Microsoft.Extensions.Logging;
using Spindle.Cli.Hosting;
using Spindle.Client;
using Spindle.Devices.Native;
using Spindle.Devices.Nbd;
using Spindle.Fuse.Devices;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>
/// The options <c>spindle attach</c> has for the kernel's own NBD device (/dev/nbdN), and the background process
/// that keeps such a device attached (<see cref="AttachKernelDaemon"/>). The device logic is Spindle.Devices'; this maps
/// options and records the attachment like a FUSE one, so detach, links and names work alike.
/// </summary>
internal sealed class AttachKernelOptions
{
    public const string Nbd = "nbd";
    public const string Fuse = "fuse";

    public Option<string?> Device { get; } = new("--device")
    {
        Description = "nbd (the kernel's NBD driver: /dev/nbdN) or fuse (a FUSE file on a loop device) [default: nbd when the driver is there].",
    };

    public Option<int?> NbdIndex { get; } = new("--nbd") { Description = "Use /dev/nbdN [default: the first unused one]." };

    public Option<string?> Adopt { get; } = new("--adopt")
    {
        Description = "Take over watching /dev/nbdN attached by an earlier spindle attach (restarted or died); SOURCE defaults to what it recorded.",
    };

    public Option<bool> Relay { get; } = new("--relay")
    {
        Description = "nbd devices: the kernel talks to this process, which carries requests with the client (TLS, --path, replay); the default for nbds:// and --path. Plain nbd:// is direct: the kernel talks to the server.",
    };

    public Option<double?> IoTimeout { get; } = new("--io-timeout")
    {
        Description = "nbd devices: the kernel's request timeout in seconds; a server restart stalls I/O for at most about this long [default: 10 direct].",
    };

    public void AddTo(Command command)
    {
        foreach (var option in new Option[] { Device, NbdIndex, Adopt, Relay, IoTimeout })
        {
            command.Options.Add(option);
        }
    }

    /// <summary>These options as command-line arguments again (for the background process), the device kind decided.</summary>
    public IEnumerable<string> ToArguments(ParseResult parse, string kind)
    {
        yield return Device.Name;
        yield return kind;
        if (parse.GetValue(NbdIndex) is { } index)
        {
            yield return NbdIndex.Name;
            yield return index.ToString(CultureInfo.InvariantCulture);
        }

        if (parse.GetValue(Relay))
        {
            yield return Relay.Name;
        }

        if (parse.GetValue(IoTimeout) is { } timeout)
        {
            yield return IoTimeout.Name;
            yield return timeout.ToString(CultureInfo.InvariantCulture);
        }
    }

    /// <summary>nbd or fuse: as asked, else nbd when this kernel has the driver.</summary>
    public string? ChooseKind(ParseResult parse, out string? error)
    {
        error = null;
        switch (parse.GetValue(Device))
        {
            case null:
                return NbdDriver.IsAvailable(out _) ? Nbd : Fuse;
            case Nbd:
                if (!NbdDriver.IsAvailable(out var reason))
                {
                    error = $"--device nbd: {reason}";
                    return null;
                }

                return Nbd;
            case Fuse:
                return Fuse;
            case { } other:
                error = $"--device '{other}': use nbd or fuse";
                return null;
        }
    }
}

/// <summary>The background process of an nbd attachment.</summary>
internal static class AttachKernelDaemon
{
    /// <summary>
    /// Attaches (or adopts) the device, records it, watches it (replacing lost connections) until a signal or a
    /// disconnect from outside. On the first signal: a device nothing holds is disconnected; a direct device in use
    /// (mounted, swap) is left attached, the kernel keeps it (a later attach --adopt watches it again); a relay
    /// device in use is served until released, or until a second signal.
    /// </summary>
    public static async Task<int> RunDaemonAsync(string name, string source, MountSourceOptions sourceOptions, AttachKernelOptions kernel, ParseResult parse,
        string? adopt, LogLevel level, IReadOnlyList<string> arguments)
    {
        DaemonProcess.StartNewSession();
        using var signals = new MountSignals();
        using var loggerFactory = CliLogging.Create(level);
        var logger = loggerFactory.CreateLogger("Spindle.Attach");
        var state = (AttachState.Load(name) ?? new AttachState { Name = name }) with
        {
            Pid = Environment.ProcessId,
            // An adoption finds the state of the earlier process, ready: this one is not, yet.
            Phase = AttachState.Starting,
            Error = null,
            Source = source,
            Kind = AttachKernelOptions.Nbd,
            Arguments = arguments,
            Started = DateTimeOffset.UtcNow,
        };
        state.Save();
        Environment.CurrentDirectory = "/";

        // Before anything else allocates: a daemon serving a device the kernel may swap to must stay in memory.
        MemoryLock.LockAll(logger);
        MemoryLock.ExemptFromOomKiller();
        using var driver = NbdDriver.TryOpen(out var missing);
        if (driver is null)
        {
            return Failed(state, missing!, logger);
        }

        var options = new NbdKernelOptions
        {
            Index = parse.GetValue(kernel.NbdIndex) is { } index ? (uint)index : null,
            Connections = sourceOptions.Connections,
            DeadTimeout = sourceOptions.DeadTimeout ?? TimeSpan.FromMinutes(5),
            IoTimeout = parse.GetValue(kernel.IoTimeout) is { } seconds ? TimeSpan.FromSeconds(seconds) : null,
            BackendIdentifier = source,
        };

        INbdConnectionSource connectionSource;
        BlockDevice? relayDevice = null;
        var isNbdUri = NbdUri.LooksLikeUri(source);
        // Direct only where the kernel can carry the connection itself: one plain TCP or Unix-socket server.
        var relay = parse.GetValue(kernel.Relay) || sourceOptions.Paths.Count > 0 || !isNbdUri || !NbdUri.TryParse(source, out var parsed, out _) || parsed!.RequiresTls;
        if (relay)
        {
            try
            {
                relayDevice = await MountSource.OpenAsync(source, sourceOptions with { LoggerFactory = loggerFactory }, CancellationToken.None).ConfigureAwait(false);
            }
            catch (ConfigurationException exception)
            {
                return Failed(state, exception.Message, logger);
            }

            connectionSource = new RelayConnectionSource(relayDevice, loggerFactory, $"relay to {source}");
        }
        else
        {
            connectionSource = new DirectConnectionSource(NbdUri.Parse(source), new NbdClientOptions { DiscoverIdentity = true }, logger);
        }

        NbdKernelDevice device;
        try
        {
            if (adopt is not null)
            {
                var adopted = NbdDriver.ParseDevice(adopt) ?? throw new InvalidOperationException($"--adopt {adopt}: not an nbd device");
                device = await NbdKernelDevice.AdoptAsync(driver, connectionSource, adopted, Math.Max(1, state.Connections), options, logger, CancellationToken.None).ConfigureAwait(false);
            }
            else
            {
                device = await NbdKernelDevice.AttachAsync(driver, connectionSource, options, logger, CancellationToken.None).ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is NbdException or IOException or InvalidOperationException or System.Net.Sockets.SocketException)
        {
            await connectionSource.DisposeAsync().ConfigureAwait(false);
            return Failed(state, exception.Message, logger);
        }

        await using (device.ConfigureAwait(false))
        {
            var identity = relayDevice is NbdBlockDevice nbd ? nbd.Identity : device.Export.Identity ?? await DiscoverIdentityAsync(source, logger).ConfigureAwait(false);
            IReadOnlyList<string> links = [];
            if (identity is { IsEmpty: false })
            {
                var problems = new List<string>();
                links = AttachLinks.Create(device.DevicePath, identity.Uuid, identity.Label, identity.Serial, problems);
                foreach (var problem in problems)
                {
                    logger.LogWarning("{Problem}", problem);
                }
            }

            state = state with
            {
                Phase = AttachState.Ready,
                NbdDevice = device.DevicePath,
                Mode = device.IsRelay ? "relay" : "direct",
                Connections = device.Connections,
                ReadOnly = device.Export.IsReadOnly,
                Links = links,
            };
            state.Save();

            using var stop = new CancellationTokenSource();
            _ = signals.First.ContinueWith(_ => stop.Cancel(), TaskScheduler.Default);
            var gone = await device.WatchAsync(stop.Token).ConfigureAwait(false);
            if (!gone)
            {
                await StopAsync(device, signals, logger).ConfigureAwait(false);
            }

            if (!driver.IsConnected(device.Index))
            {
                AttachLinks.Remove(links, device.DevicePath);
                if (AttachState.Load(name) is { } current && current.Pid == Environment.ProcessId)
                {
                    File.Delete(AttachPaths.State(name));
                }
            }
        }

        // A device left attached keeps its state (with this pid gone): spindle detach and attach --adopt find it.
        return 0;
    }

    /// <summary>
    /// The export's stable names, for the links of a direct device. The kernel's connections negotiate no structured
    /// replies, and servers describe their names best with them, so a short connection of the client's own asks.
    /// </summary>
    private static async Task<ExportIdentity?> DiscoverIdentityAsync(string source, ILogger logger)
    {
        try
        {
            await using var probe = await NbdClient.ConnectAsync(source, new NbdClientOptions { DiscoverIdentity = true, DeadConnectionTimeout = TimeSpan.Zero }).ConfigureAwait(false);
            return probe.Export.Identity;
        }
        catch (Exception exception) when (exception is NbdException or IOException)
        {
            logger.LogWarning("No stable-name links: asking {Source} for its names failed: {Message}", source, exception.Message);
            return null;
        }
    }

    private static async Task StopAsync(NbdKernelDevice device, MountSignals signals, ILogger logger)
    {
        if (device.IsInUse())
        {
            if (!device.IsRelay)
            {
                logger.LogWarning("{Device} is in use: leaving it attached (the kernel keeps it); 'spindle attach --adopt {Device}' watches it again", device.DevicePath, device.DevicePath);
                return;
            }

            logger.LogWarning("{Device} is in use: serving it until it is released; signal again to stop anyway", device.DevicePath);
            while (device.IsInUse() && !signals.Second.IsCompleted)
            {
                await Task.WhenAny(signals.Second, Task.Delay(1000)).ConfigureAwait(false);
            }

            if (device.IsInUse())
            {
                return;
            }
        }

        try
        {
            device.Disconnect();
        }
        catch (Devices.Netlink.NetlinkException exception)
        {
            logger.LogWarning("{Device}: {Message}", device.DevicePath, exception.Message);
        }
    }

    private static int Failed(AttachState state, string error, ILogger logger)
    {
        logger.LogError("{Error}", error);
        (state with { Phase = AttachState.Failed, Error = error }).Save();
        return CliErrors.Failure;
    }
}
