using System.CommandLine;
using System.Net;
using Microsoft.Extensions.Logging;
using Spindle.Cli.Hosting;
using Spindle.Protocol;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Server.Security;

namespace Spindle.Cli.Commands;

/// <summary><c>spindle serve</c>: serve a file, a block device, a memory disk, or the exports of a configuration file.</summary>
internal static class ServeCommand
{
    private const string Examples = """
        Serve a file, a block device, a Ceph RBD image, a sparse memory disk or the exports of a configuration file
        over NBD.

        Examples:
          spindle serve disk.img                      serve disk.img as the default export on port 10809
          spindle serve vm.qcow2                      a qcow2 image (detected; --format raw serves its bytes as they are)
          spindle serve vm.qcow2@before-upgrade       an internal snapshot of it, read-only (docs/qcow2.md)
          spindle serve --port 1234 /dev/sdb1         serve a block device on port 1234
          spindle serve -r --bind 127.0.0.1 disk.img  read-only, reachable from this machine only
          spindle serve --memory 1G                   a 1 GiB sparse disk in memory
          spindle serve rbd:rbd/vm1 --rbd-conf /etc/ceph/ceph.conf --rbd-id admin
                                                      a Ceph RBD image (pool/[namespace/]image[@snap]; docs/rbd.md)
          spindle serve --unix /run/disk.sock disk.img
          spindle serve --config /etc/spindle/config  several exports (nbd-server's format; see docs/configuration.md)
          spindle serve --tls-certificates /etc/spindle/tls --tls require disk.img   TLS only
          spindle serve --cow base.img                writes go to a temporary overlay; base.img is never written
          spindle serve --overlay vm.qcow2 base.img   writes kept in vm.qcow2, a qcow2 overlay of base.img (created if missing)
          spindle serve --partition 2 disk.img        serve partition 2 of an MBR or GPT disk image
          spindle serve --config /etc/spindle/spindle.conf --metrics 127.0.0.1:9100 --control /run/spindle/control.sock
                                                      metrics and status page, live changes with spindle ctl

        Clients: nbdinfo nbd://HOST, qemu-img info nbd://HOST:10809/NAME, nbd-client HOST /dev/nbd0.
        By default Spindle listens on every interface ([::] and 0.0.0.0) with no authentication: use --bind
        to restrict it, --tls-certificates DIR for TLS (scripts/make-certs.sh DIR), allow lists in a config file.
        SIGINT or SIGTERM stops it gracefully (in-flight requests answered, data flushed); SIGHUP re-reads --config.
        Under systemd it takes sockets passed by a .socket unit, reports readiness and logs to the journal
        (docs/operations.md).
        """;

    public static Command Create()
    {
        var image = new Argument<string?>("image")
        {
            Description = "The file or block device to serve (raw or qcow2; FILE@SNAPSHOT for a qcow2 internal snapshot), or rbd:pool/[namespace/]image[@snapshot] for a Ceph RBD image (omit with --memory or --config).",
            Arity = ArgumentArity.ZeroOrOne,
        };
        var port = new Option<int?>("--port", "-p") { Description = "TCP port to listen on [default: 10809]." };
        var bind = new Option<string[]>("--bind", "-b")
        {
            Description = "Address to listen on; repeat for several [default: every interface, IPv6 and IPv4].",
            AllowMultipleArgumentsPerToken = false,
        };
        var unix = new Option<string?>("--unix", "-U") { Description = "Listen on this Unix socket (only, unless --port or --bind is given too)." };
        var name = new Option<string>("--name", "-n")
        {
            Description = "Export name clients ask for [default: \"\", the default export].",
            DefaultValueFactory = _ => string.Empty,
        };
        var description = new Option<string?>("--description", "-d") { Description = "Export description shown by LIST and INFO." };
        var readOnly = new Option<bool>("--read-only", "-r") { Description = "Serve read-only: writes fail with EPERM." };
        var memory = new Option<string?>("--memory", "-m") { Description = "Serve a sparse in-memory disk of this size (e.g. 1G) instead of a file." };
        var create = new Option<string?>("--create") { Description = "Create IMAGE, sparse, with this size if it does not exist (e.g. 10G)." };
        var format = new Option<string?>("--format", "-f") { Description = "The image format of IMAGE or of the images below --dir: raw, qcow2 or auto [default: auto, detected from the header]." };
        var config = new Option<string?>("--config", "-C") { Description = "Serve the exports of this configuration file (nbd-server's format)." };
        var rbdConf = new Option<string?>("--rbd-conf") { Description = "With rbd:IMAGE: the ceph.conf to read [default: Ceph's search, e.g. /etc/ceph/ceph.conf]." };
        var rbdId = new Option<string?>("--rbd-id") { Description = "With rbd:IMAGE: the cephx user, without \"client.\" [default: admin]." };
        var rbdKeyring = new Option<string?>("--rbd-keyring") { Description = "With rbd:IMAGE: the keyring holding the user's key [default: from the ceph.conf]." };
        var noList = new Option<bool>("--no-list") { Description = "Refuse NBD_OPT_LIST (clients cannot list the exports)." };
        var tlsCertificates = new Option<string?>("--tls-certificates")
        {
            Description = "Serve TLS with DIR/server-cert.pem and DIR/server-key.pem (DIR/ca-cert.pem checks client certificates). scripts/make-certs.sh DIR makes them.",
        };
        var tls = new Option<string?>("--tls") { Description = "off, on (offered) or require (nothing but STARTTLS before TLS) [default: on with --tls-certificates]." };
        var tlsVerifyPeer = new Option<bool>("--tls-verify-peer") { Description = "Require a client certificate signed by DIR/ca-cert.pem." };
        var directory = new Option<string?>("--dir")
        {
            Description = "Serve every image below DIR by its relative name, opened on demand; DIR may contain %SESSNAME% (the client's TLS identity or --session name).",
        };
        var sessions = new Option<string[]>("--session") { Description = "NAME=ADDRESS[/PREFIX]: the session name of clients from there (repeatable)." };
        var uuid = new Option<string?>("--uuid") { Description = "The export's UUID (clients may ask for by-uuid/UUID) [default: generated once and kept with the image]." };
        var label = new Option<string?>("--label") { Description = "A label clients may ask for as by-label/LABEL." };
        var serial = new Option<string?>("--serial") { Description = "A serial number clients may ask for as by-serial/SERIAL." };
        var stateDir = new Option<string?>("--state-dir") { Description = "Where UUIDs that cannot be kept in the image's xattr are stored [default: /var/lib/spindle for root]." };
        var idleTimeout = new Option<double?>("--idle-timeout") { Description = "Close connections idle (nothing in flight) for this many seconds [default: never]." };
        var handshakeTimeout = new Option<double?>("--handshake-timeout") { Description = "Seconds a client has to finish negotiating [default: 10]." };
        var shutdownTimeout = new Option<double?>("--shutdown-timeout") { Description = "Seconds a stop waits for in-flight requests [default: 10]." };
        var maxConnections = new Option<int?>("--max-connections") { Description = "Simultaneous connections allowed [default: 1024]." };
        var printUri = new Option<bool>("--print-uri") { Description = "Print the NBD URI of the export on standard output once listening." };
        var logLevel = new Option<string?>("--log-level") { Description = "trace, debug, information, warning, error or none [default: information]." };
        var verbose = new Option<bool>("--verbose", "-v") { Description = "Same as --log-level debug." };
        var quiet = new Option<bool>("--quiet", "-q") { Description = "Same as --log-level warning." };
        var pidFile = new Option<string?>("--pid-file") { Description = "Write the process id to this file once listening (removed at exit)." };
        var metrics = new Option<string?>("--metrics") { Description = "Serve Prometheus metrics at http://ADDR:PORT/metrics and a status page at / (e.g. 127.0.0.1:9100)." };
        var control = new Option<string?>("--control") { Description = "Answer spindle ctl on this Unix socket (root and the server's user only), e.g. /run/spindle/control.sock." };

        var layers = new LayerOptions();

        var command = new Command("serve", Examples)
        {
            image, port, bind, unix, name, description, readOnly, memory, create, format, config, rbdConf, rbdId, rbdKeyring, noList,
            directory, sessions, uuid, label, serial, stateDir, tlsCertificates, tls, tlsVerifyPeer, idleTimeout, handshakeTimeout, shutdownTimeout, maxConnections, printUri, logLevel, verbose, quiet, pidFile, metrics, control,
        };
        layers.AddTo(command);

        command.SetAction(async (parse, cancellationToken) =>
        {
            var level = LogLevel.Information;
            if (parse.GetValue(verbose))
            {
                level = LogLevel.Debug;
            }
            else if (parse.GetValue(quiet))
            {
                level = LogLevel.Warning;
            }

            if (parse.GetValue(logLevel) is { } levelText && !CliLogging.TryParseLevel(levelText, out level))
            {
                return CliErrors.Usage($"unknown log level '{levelText}'");
            }

            ServerConfiguration configuration;
            try
            {
                configuration = BuildConfiguration(
                    parse.GetValue(image), parse.GetValue(config), parse.GetValue(memory), parse.GetValue(create),
                    parse.GetValue(name)!, parse.GetValue(description), parse.GetValue(readOnly),
                    RbdSettings(parse.GetValue(rbdConf), parse.GetValue(rbdId), parse.GetValue(rbdKeyring)), parse.GetValue(directory), parse.GetValue(format));
                foreach (var session in parse.GetValue(sessions) ?? [])
                {
                    configuration.Server.SessionNames.Add(IniConfigurationReader.ParseSessionName(session, "--session"));
                }
                layers.Apply(parse, configuration, parse.GetValue(config) is not null);
                ApplyListening(configuration, parse.GetValue(port), parse.GetValue(bind), parse.GetValue(unix));
                if (parse.GetValue(noList))
                {
                    configuration.Server.AllowList = false;
                }

                if (parse.GetValue(handshakeTimeout) is { } handshake)
                {
                    configuration.Server.HandshakeTimeout = TimeSpan.FromSeconds(handshake);
                }

                if (parse.GetValue(shutdownTimeout) is { } shutdown)
                {
                    configuration.Server.ShutdownTimeout = TimeSpan.FromSeconds(shutdown);
                }

                if (parse.GetValue(tlsCertificates) is { } certificates)
                {
                    configuration.Tls ??= new TlsSettings();
                    configuration.Tls.CertificateDirectory = certificates;
                }

                if (parse.GetValue(tls) is { } tlsMode)
                {
                    configuration.Tls ??= new TlsSettings();
                    configuration.Tls.Mode = tlsMode.ToLowerInvariant() switch
                    {
                        "off" => TlsMode.Off,
                        "on" => TlsMode.On,
                        "require" => TlsMode.Require,
                        _ => throw new ConfigurationException($"--tls must be off, on or require, not '{tlsMode}'"),
                    };
                }

                if (parse.GetValue(tlsVerifyPeer))
                {
                    configuration.Tls ??= new TlsSettings();
                    configuration.Tls.VerifyPeer = true;
                }

                if (parse.GetValue(idleTimeout) is { } idle)
                {
                    configuration.Server.IdleTimeout = idle > 0 ? TimeSpan.FromSeconds(idle) : null;
                }

                configuration.LoadTls();
                if (parse.GetValue(stateDir) is { } state)
                {
                    configuration.StateDirectory = state;
                }

                if (parse.GetValue(uuid) is { } uuidText || parse.GetValue(label) is not null || parse.GetValue(serial) is not null)
                {
                    if (configuration.Exports.Count != 1)
                    {
                        throw new ConfigurationException("--uuid, --label and --serial name one export: with --config, set uuid, label and serial in its section");
                    }

                    var exportOptions = configuration.Exports[0].Options;
                    if (parse.GetValue(uuid) is { } text)
                    {
                        exportOptions.Uuid = Guid.TryParse(text, out var parsed) ? parsed : throw new ConfigurationException($"--uuid '{text}' is not a UUID");
                    }

                    foreach (var (value, setter, what) in new (string?, Action<string>, string)[] { (parse.GetValue(label), v => exportOptions.Label = v, "--label"), (parse.GetValue(serial), v => exportOptions.Serial = v, "--serial") })
                    {
                        if (value is not null)
                        {
                            setter(ExportIdentity.IsValidTag(value, out var problem) ? value : throw new ConfigurationException($"{what} '{value}' {problem}"));
                        }
                    }
                }

                if (parse.GetValue(maxConnections) is { } connections)
                {
                    configuration.Server.MaxConnections = connections;
                }
            }
            catch (ConfigurationException exception)
            {
                return CliErrors.Usage(exception.Message);
            }

            var hostOptions = new HostOptions
            {
                ConfigFile = parse.GetValue(config),
                ForceReadOnly = parse.GetValue(readOnly),
                PrintUri = parse.GetValue(printUri),
                PidFile = parse.GetValue(pidFile),
                Metrics = parse.GetValue(metrics),
                ControlSocket = parse.GetValue(control),
            };
            using var loggerFactory = CliLogging.Create(level);
            var host = new ServerHost(configuration, hostOptions, loggerFactory);
            await using (host.ConfigureAwait(false))
            {
                return await host.RunAsync().ConfigureAwait(false);
            }
        });
        return command;
    }

    /// <summary>The positional argument's prefix that selects a Ceph RBD image instead of a file.</summary>
    internal const string RbdPrefix = "rbd:";

    internal static ServerConfiguration BuildConfiguration(string? image, string? configFile, string? memory, string? create, string name, string? description, bool readOnly,
        IReadOnlyDictionary<string, string>? rbdSettings = null, string? directory = null, string? format = null)
    {
        if (format is not null)
        {
            _ = ImageBackend.ParseFormat(format, "--format");
            if (configFile is not null || memory is not null || (image is not null && image.StartsWith(RbdPrefix, StringComparison.Ordinal)))
            {
                throw new ConfigurationException("--format applies to a file argument or --dir (in a configuration file, give format = raw|qcow2 in the export's section)");
            }
        }

        var isRbd = image is not null && image.StartsWith(RbdPrefix, StringComparison.Ordinal);
        if (rbdSettings is { Count: > 0 } && !isRbd)
        {
            throw new ConfigurationException("--rbd-conf, --rbd-id and --rbd-keyring apply to an rbd:pool/image argument (in a configuration file, give conf, id and keyring in the export's section)");
        }

        if (isRbd && create is not null)
        {
            throw new ConfigurationException("--create applies to files; create an RBD image with: rbd create --size SIZE pool/image");
        }

        var sources = (image is null ? 0 : 1) + (configFile is null ? 0 : 1) + (memory is null ? 0 : 1) + (directory is null ? 0 : 1);
        if (sources == 0)
        {
            throw new ConfigurationException("nothing to serve: give a file or device, --memory SIZE, --dir DIR, or --config FILE (see spindle serve --help)");
        }

        if (sources > 1)
        {
            throw new ConfigurationException("give only one of: a file or device, --memory, --dir, --config");
        }

        if (configFile is not null)
        {
            var fromFile = IniConfigurationReader.ReadFile(configFile);
            if (fromFile.Exports.Count == 0)
            {
                throw new ConfigurationException($"{configFile}: no exports defined (add a [name] section)");
            }

            if (readOnly)
            {
                fromFile.Exports.ForEach(e => e.Options.ReadOnly = true);
            }

            return fromFile;
        }

        var configuration = new ServerConfiguration();
        var options = new ExportOptions { Name = name, Description = description, ReadOnly = readOnly };
        if (memory is not null)
        {
            configuration.Exports.Add(new ExportDefinition { Options = options, Backend = "memory", Size = SizeParser.Parse(memory, "--memory") });
        }
        else if (directory is not null)
        {
            configuration.Exports.Add(new ExportDefinition { Options = options, Backend = "directory", Location = directory, Prefix = name.Trim('/'), Format = format });
        }
        else if (isRbd)
        {
            var definition = new ExportDefinition { Options = options, Backend = "rbd", Location = image![RbdPrefix.Length..] };
            foreach (var (key, value) in rbdSettings ?? new Dictionary<string, string>())
            {
                definition.Settings[key] = value;
            }

            configuration.Exports.Add(definition);
        }
        else
        {
            configuration.Exports.Add(new ExportDefinition
            {
                Options = options,
                Backend = "file",
                Location = image,
                Size = create is null ? null : SizeParser.Parse(create, "--create"),
                Format = format,
            });
        }

        return configuration;
    }

    private static Dictionary<string, string> RbdSettings(string? conf, string? id, string? keyring)
    {
        var settings = new Dictionary<string, string>(StringComparer.Ordinal);
        if (conf is not null)
        {
            settings["conf"] = conf;
        }

        if (id is not null)
        {
            settings["id"] = id;
        }

        if (keyring is not null)
        {
            settings["keyring"] = keyring;
        }

        return settings;
    }

    private static void ApplyListening(ServerConfiguration configuration, int? port, string[]? bind, string? unix)
    {
        var hasCommandLineListening = port is not null || (bind is { Length: > 0 }) || unix is not null;
        if (!hasCommandLineListening)
        {
            configuration.ResolveEndpoints();
            return;
        }

        if (port is < 0 or > 65535)
        {
            throw new ConfigurationException($"--port {port} is not a TCP port");
        }

        var endpoints = configuration.Server.Endpoints;
        endpoints.Clear();
        if (unix is not null)
        {
            endpoints.Add(new ListenEndpoint.Unix(unix));
        }

        if (unix is null || port is not null || bind is { Length: > 0 })
        {
            var addresses = bind is { Length: > 0 } ? bind.Select(ParseAddress).ToList() : [IPAddress.IPv6Any];
            foreach (var address in addresses)
            {
                endpoints.Add(new ListenEndpoint.Tcp(address, port ?? configuration.Port ?? NbdLimits.DefaultPort));
            }
        }
    }

    private static IPAddress ParseAddress(string text)
    {
        var trimmed = text.Trim('[', ']');
        if (IPAddress.TryParse(trimmed, out var address))
        {
            return address;
        }

        if (trimmed.Equals("localhost", StringComparison.OrdinalIgnoreCase))
        {
            return IPAddress.Loopback;
        }

        throw new ConfigurationException($"--bind '{text}' is not an IP address");
    }
}
