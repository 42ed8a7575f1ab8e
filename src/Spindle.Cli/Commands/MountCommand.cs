using System.CommandLine;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Spindle.Cli.Hosting;
using Spindle.Cli.Hosting.Metrics;
using Spindle.Fuse;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary><c>spindle mount SOURCE DIR</c>: a block device as the file DIR/disk, served through FUSE until stopped.</summary>
internal static class MountCommand
{
    private const string Examples = """
        Expose SOURCE as one file, DIR/disk, in a FUSE mount on the existing directory DIR, and serve it until
        stopped. Reads and writes of the file reach SOURCE; fsync flushes it; writes through an O_SYNC/O_DSYNC
        handle are durable before they return; fallocate --punch-hole and --zero-range zero (and may deallocate).
        A loop device makes it a block device: losetup --direct-io=on --find --show DIR/disk (or use spindle attach).

        SOURCE is a file, a block device, memory:SIZE (a sparse disk in memory), or an NBD URI
        (nbd://HOST[:PORT]/EXPORT, nbds://... for TLS, nbd+unix:///EXPORT?socket=PATH). An NBD export survives
        server restarts and network cuts: requests wait while the client reconnects and are sent again; only after
        --dead-timeout do they fail (EIO). --path adds more servers of the same export (multipath).

        Examples:
          spindle mount disk.img /mnt/d              DIR/disk reads and writes disk.img
          spindle mount -r /dev/sdb /mnt/d           read-only
          spindle mount memory:1G /mnt/d             a 1 GiB scratch disk
          spindle mount --create 10G new.img /mnt/d  create new.img (sparse) first
          spindle mount nbd://server/disk /mnt/d     a remote export
          spindle mount nbd://a/disk --path nbd://b/disk /mnt/d   two servers of one export

        Prints the file's path once mounted. SIGINT, SIGTERM or SIGHUP unmounts and flushes SOURCE; if the file is
        still in use (a loop device bound to it), the mount is detached from DIR and served until released, and a
        second signal aborts it. A mount left behind by a crash (ENOTCONN) is replaced by the next spindle mount on
        DIR, or removed with: fusermount3 -u DIR (or umount -l DIR).
        """;

    public static Command Create()
    {
        var source = new Argument<string>("source") { Description = "A file, a block device, memory:SIZE, or an NBD URI." };
        var directory = new Argument<string>("dir") { Description = "An existing directory to mount on." };
        var options = new MountCommandOptions();
        var command = new Command("mount", Examples) { source, directory };
        options.AddTo(command);

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

            using var loggerFactory = CliLogging.Create(level);
            var logger = loggerFactory.CreateLogger("Spindle.Mount");
            sourceOptions = sourceOptions with { LoggerFactory = loggerFactory };
            return await RunAsync(parse.GetValue(source)!, parse.GetValue(directory)!, sourceOptions, mountOptions, logger, cancellationToken).ConfigureAwait(false);
        });
        return command;
    }

    private static async Task<int> RunAsync(string source, string directory, MountSourceOptions sourceOptions, FuseMountOptions mountOptions, ILogger logger, CancellationToken cancellationToken)
    {
        // Before anything is mounted: a signal arriving between the mount and the registration would otherwise
        // kill the process with its default action and leave a stale mount.
        using var signals = new MountSignals();
        BlockDevice device;
        ClientStatus? metrics;
        try
        {
            metrics = ClientStatus.Start(sourceOptions.Metrics, logger);
            device = await MountSource.OpenAsync(source, sourceOptions, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is ConfigurationException or IOException)
        {
            return CliErrors.Fail(exception.Message);
        }

        await using var stopMetrics = metrics;

        await using (device.ConfigureAwait(false))
        {
            FuseMount mount;
            try
            {
                mount = await FuseMount.MountAsync(device, directory, mountOptions, logger, cancellationToken).ConfigureAwait(false);
            }
            catch (FuseMountException exception)
            {
                return CliErrors.Fail(exception.Message);
            }

            Console.Out.WriteLine(mount.FilePath);
            Console.Out.Flush();
            await ServeUntilStoppedAsync(mount, signals, logger, beforeUnmount: null).ConfigureAwait(false);
            return 0;
        }
    }

    /// <summary>
    /// Serves <paramref name="mount"/> until it is unmounted from outside or a signal arrives (<paramref name="signals"/>,
    /// registered before mounting so that no signal finds the default action in place). The first SIGINT,
    /// SIGTERM or SIGHUP unmounts (after <paramref name="beforeUnmount"/>), lazily if the file is in use, and keeps
    /// serving until the kernel releases it; a second one aborts the connection. The device is flushed on the way out.
    /// </summary>
    internal static async Task ServeUntilStoppedAsync(FuseMount mount, MountSignals signals, ILogger logger, Func<Task>? beforeUnmount)
    {
        await using (mount.ConfigureAwait(false))
        {
            if (await Task.WhenAny(signals.First, mount.Completion).ConfigureAwait(false) != mount.Completion)
            {
                logger.LogInformation("Stopping: unmounting {MountPoint}", mount.MountPoint);
                if (beforeUnmount is not null)
                {
                    await beforeUnmount().ConfigureAwait(false);
                }

                try
                {
                    await mount.UnmountAsync(lazy: true).ConfigureAwait(false);
                }
                catch (FuseMountException exception)
                {
                    logger.LogWarning("{Message}", exception.Message);
                }

                if (!mount.Completion.IsCompleted)
                {
                    logger.LogWarning("{File} is still in use ({Handles} open handles): serving it until it is released; signal again to abort",
                        mount.FilePath, mount.OpenHandles);
                }

                if (await Task.WhenAny(signals.Second, mount.Completion).ConfigureAwait(false) != mount.Completion)
                {
                    mount.Abort();
                }
            }
            else
            {
                logger.LogInformation("{MountPoint} was unmounted", mount.MountPoint);
            }
        }
    }
}

/// <summary>The options <c>spindle mount</c> and <c>spindle attach</c> share, mapped onto <see cref="FuseMountOptions"/>.</summary>
internal sealed class MountCommandOptions
{
    public Option<bool> ReadOnly { get; } = new("--read-only", "-r") { Description = "Expose SOURCE read-only (writes fail with EROFS)." };

    public Option<string?> Create { get; } = new("--create") { Description = "Create a missing SOURCE file, sparse, with this size (e.g. 10G)." };

    public Option<string?> FileName { get; } = new("--file-name") { Description = "Name of the file in the mount [default: disk]." };

    public Option<bool> AllowOther { get; } = new("--allow-other") { Description = "Let other users open the file (FUSE allow_other; file permissions still apply)." };

    public Option<bool> PageCache { get; } = new("--page-cache") { Description = "Use the kernel's page cache for the file (readahead, cached reads) instead of direct I/O." };

    public Option<string?> MaxTransfer { get; } = new("--max-transfer") { Description = "Largest single read or write request [default: 1M]." };

    public Option<int?> MaxThreads { get; } = new("--max-threads") { Description = "Most threads serving requests [default: 32]." };

    public Option<bool> Fusermount { get; } = new("--fusermount") { Description = "Mount through fusermount3 even as root." };

    public Option<string[]> Path { get; } = new("--path")
    {
        Description = "Another NBD URI serving the same export (multipath: requests spread over the live paths, a dead one's move to the others); repeat for more.",
    };

    /// <summary>The client commands' --dead-timeout, described for a device (EIO, a hard mount).</summary>
    public Option<string?> DeadTimeout { get; } = ClientCommandSupport.DeadTimeoutOption(
        "NBD sources: seconds requests wait for a lost server to come back before failing with EIO, or 'never' (a hard mount) [default: 300].");

    public Option<int?> Connections { get; } = new("--connections", "-C") { Description = "NBD sources: connections per server when the export advertises multi-conn [default: 1]." };

    public Option<string?> LogLevel { get; } = new("--log-level") { Description = "trace, debug, information, warning, error or none [default: information]." };

    public Option<bool> Verbose { get; } = new("--verbose", "-v") { Description = "Same as --log-level debug." };

    public Option<bool> Quiet { get; } = new("--quiet", "-q") { Description = "Same as --log-level warning." };

    public Option<string?> Metrics { get; } = new("--metrics") { Description = "Serve the client's Prometheus metrics at http://ADDR:PORT/metrics and a status page at / (e.g. 127.0.0.1:9101)." };

    public void AddTo(Command command)
    {
        foreach (var option in new Option[] { ReadOnly, Create, FileName, AllowOther, PageCache, MaxTransfer, MaxThreads, Fusermount, Path, DeadTimeout, Connections, LogLevel, Verbose, Quiet, Metrics })
        {
            command.Options.Add(option);
        }
    }

    public bool TryGetLogLevel(ParseResult parse, out Microsoft.Extensions.Logging.LogLevel level, out string error)
    {
        error = string.Empty;
        level = Microsoft.Extensions.Logging.LogLevel.Information;
        if (parse.GetValue(Verbose))
        {
            level = Microsoft.Extensions.Logging.LogLevel.Debug;
        }
        else if (parse.GetValue(Quiet))
        {
            level = Microsoft.Extensions.Logging.LogLevel.Warning;
        }

        if (parse.GetValue(LogLevel) is { } text && !CliLogging.TryParseLevel(text, out level))
        {
            error = $"unknown log level '{text}'";
            return false;
        }

        return true;
    }

    /// <summary>The options given, as command-line arguments again (for the attach server).</summary>
    public IEnumerable<string> ToArguments(ParseResult parse)
    {
        foreach (var flag in new[] { ReadOnly, AllowOther, PageCache, Fusermount, Verbose, Quiet })
        {
            if (parse.GetValue(flag))
            {
                yield return flag.Name;
            }
        }

        foreach (var path in parse.GetValue(Path) ?? [])
        {
            yield return Path.Name;
            yield return path;
        }

        foreach (var valued in new[] { Create, FileName, MaxTransfer, DeadTimeout, LogLevel, Metrics })
        {
            if (parse.GetValue(valued) is { } value)
            {
                yield return valued.Name;
                yield return value;
            }
        }

        if (parse.GetValue(MaxThreads) is { } threads)
        {
            yield return MaxThreads.Name;
            yield return threads.ToString(System.Globalization.CultureInfo.InvariantCulture);
        }

        if (parse.GetValue(Connections) is { } connections)
        {
            yield return Connections.Name;
            yield return connections.ToString(System.Globalization.CultureInfo.InvariantCulture);
        }
    }

    /// <exception cref="ConfigurationException">An option value is not usable.</exception>
    public (FuseMountOptions Mount, MountSourceOptions Source) Build(ParseResult parse)
    {
        var mount = new FuseMountOptions
        {
            ReadOnly = parse.GetValue(ReadOnly),
            AllowOther = parse.GetValue(AllowOther),
            PageCache = parse.GetValue(PageCache),
            Mounter = parse.GetValue(Fusermount) ? FuseMounter.Fusermount : FuseMounter.Auto,
        };
        if (parse.GetValue(FileName) is { } fileName)
        {
            if (fileName.Length == 0 || fileName is "." or ".." || fileName.Contains('/', StringComparison.Ordinal))
            {
                throw new ConfigurationException($"--file-name '{fileName}' is not a file name");
            }

            mount.FileName = fileName;
        }

        if (parse.GetValue(MaxTransfer) is { } transfer)
        {
            var size = SizeParser.Parse(transfer, "--max-transfer");
            if (size is < 64 * 1024 or > 16 * 1024 * 1024)
            {
                throw new ConfigurationException("--max-transfer must be between 64K and 16M");
            }

            mount.MaxTransfer = (int)size;
        }

        if (parse.GetValue(MaxThreads) is { } threads)
        {
            if (threads is < 2 or > 1024)
            {
                throw new ConfigurationException("--max-threads must be between 2 and 1024");
            }

            mount.MaxThreads = threads;
            mount.MaxInFlight = Math.Max(mount.MaxInFlight, threads);
        }

        var create = parse.GetValue(Create) is { } text ? SizeParser.Parse(text, "--create") : (long?)null;
        TimeSpan? deadTimeout;
        try
        {
            deadTimeout = ClientCommandSupport.ParseDeadTimeout(parse.GetValue(DeadTimeout));
        }
        catch (FormatException exception)
        {
            throw new ConfigurationException(exception.Message);
        }

        var connections = parse.GetValue(Connections) ?? 1;
        if (connections is < 1 or > 16)
        {
            throw new ConfigurationException("--connections must be between 1 and 16");
        }

        return (mount, new MountSourceOptions(mount.ReadOnly, create)
        {
            Paths = parse.GetValue(Path) ?? [],
            DeadTimeout = deadTimeout,
            Connections = connections,
            Metrics = parse.GetValue(Metrics),
        });
    }
}

/// <summary>SIGINT, SIGTERM and SIGHUP: the first and the second one, as tasks.</summary>
internal sealed class MountSignals : IDisposable
{
    private readonly TaskCompletionSource _first = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _second = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly PosixSignalRegistration[] _registrations;

    public MountSignals()
    {
        _registrations =
        [
            PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle),
            PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle),
            PosixSignalRegistration.Create(PosixSignal.SIGHUP, Handle),
        ];
    }

    public Task First => _first.Task;

    public Task Second => _second.Task;

    public void Dispose()
    {
        foreach (var registration in _registrations)
        {
            registration.Dispose();
        }
    }

    private void Handle(PosixSignalContext context)
    {
        context.Cancel = true;
        if (!_first.TrySetResult())
        {
            _second.TrySetResult();
        }
    }
}
