using System.Globalization;
using System.Net;
using Spindle.Protocol;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Server.Security;

namespace Spindle.Cli.Hosting;

/// <summary>
/// Reads nbd-server's configuration format (nbd-server(5)): <c>[generic]</c> first, then one section per export
/// whose name is the export name; <c>key = value</c> lines; <c>#</c> comments; booleans <c>true</c>/<c>false</c>.
/// Spindle adds a few keys (backend, size, description, block sizes). Keys nbd-server has but Spindle does not
/// implement are refused when ignoring them could change what happens to data (multifile, temporary...), and
/// reported as warnings when they are only operational (max_threads, splice...). <c>user</c> and <c>group</c> are
/// honoured: the server drops to them once it listens, or refuses to start.
/// </summary>
public static class IniConfigurationReader
{
    /// <summary>nbd-server keys with no effect here: accepted so existing files load, reported as warnings.</summary>
    private static readonly HashSet<string> IgnoredGenericKeys = new(StringComparer.OrdinalIgnoreCase)
    {
        "max_threads", "splice", "oldstyle", "tlsprio",
    };

    /// <summary>The exportname prefix that selects a Ceph RBD image.</summary>
    public const string RbdPrefix = "rbd:";

    private static readonly HashSet<string> IgnoredExportKeys = new(StringComparer.OrdinalIgnoreCase)
    {
        "splice", "sdp", "listenaddr", "sync",

        // The overlay file is always sparse.
        "sparse_cow",
    };

    /// <summary>nbd-server export keys whose absence of effect would silently change data handling.</summary>
    private static readonly HashSet<string> RefusedExportKeys = new(StringComparer.OrdinalIgnoreCase)
    {
        "multifile", "treefiles", "temporary", "virtstyle", "prerun", "postrun",
        "transactionlog", "datalog", "waitfile",
    };

    public static ServerConfiguration ReadFile(string path)
    {
        var configuration = new ServerConfiguration();
        ReadInto(configuration, path, allowGeneric: true);
        return configuration;
    }

    public static ServerConfiguration Parse(string text, string sourceName = "configuration")
    {
        var configuration = new ServerConfiguration();
        ParseInto(configuration, text.Split('\n'), sourceName, Path.GetDirectoryName(Path.GetFullPath(sourceName)) ?? ".", allowGeneric: true);
        return configuration;
    }

    private static void ReadInto(ServerConfiguration configuration, string path, bool allowGeneric)
    {
        var full = Path.GetFullPath(path);
        if (!File.Exists(full))
        {
            throw new ConfigurationException($"{full}: no such configuration file");
        }

        ParseInto(configuration, File.ReadAllLines(full), full, Path.GetDirectoryName(full)!, allowGeneric);
    }

    private static void ParseInto(ServerConfiguration configuration, IEnumerable<string> lines, string source, string directory, bool allowGeneric)
    {
        string? section = null;
        ExportDefinition? export = null;
        var genericSeen = false;
        var exportNames = new HashSet<string>(configuration.Exports.Select(e => e.Options.Name), StringComparer.Ordinal);
        var lineNumber = 0;
        foreach (var raw in lines)
        {
            lineNumber++;
            var line = raw.Trim();
            if (line.Length == 0 || line[0] is '#' or ';')
            {
                continue;
            }

            var where = $"{source}:{lineNumber}";
            if (line[0] == '[')
            {
                if (line[^1] != ']')
                {
                    throw new ConfigurationException($"{where}: section header '{line}' has no closing ']'");
                }

                section = line[1..^1].Trim();
                if (section.Equals("generic", StringComparison.Ordinal))
                {
                    if (!allowGeneric)
                    {
                        throw new ConfigurationException($"{where}: [generic] is not allowed in an included file");
                    }

                    if (genericSeen)
                    {
                        throw new ConfigurationException($"{where}: a second [generic] section");
                    }

                    genericSeen = true;
                    export = null;
                    continue;
                }

                if (!exportNames.Add(section))
                {
                    throw new ConfigurationException($"{where}: export [{section}] is defined twice");
                }

                export = new ExportDefinition { Options = new ExportOptions { Name = section }, Source = where };
                configuration.Exports.Add(export);
                continue;
            }

            var equals = line.IndexOf('=', StringComparison.Ordinal);
            if (equals <= 0)
            {
                throw new ConfigurationException($"{where}: expected 'key = value', found '{line}'");
            }

            var key = line[..equals].Trim();
            var value = line[(equals + 1)..].Trim();
            if (section is null)
            {
                throw new ConfigurationException($"{where}: '{key}' appears before any [section]");
            }

            if (export is null)
            {
                ApplyGeneric(configuration, key, value, where, directory);
            }
            else
            {
                ApplyExport(configuration, export, key, value, where);
            }
        }

        foreach (var definition in configuration.Exports)
        {
            if (definition.Backend == "file" && string.IsNullOrEmpty(definition.Location))
            {
                throw new ConfigurationException($"{definition.Source}: export [{definition.Options.Name}] needs 'exportname = /path/to/file' (or 'backend = memory' with a size)");
            }

            if (definition.Backend == "memory" && definition.Size is null)
            {
                throw new ConfigurationException($"{definition.Source}: memory export [{definition.Options.Name}] needs 'size = ...' (for example 1G)");
            }

            if (definition.Backend == "rbd" && string.IsNullOrEmpty(definition.Location))
            {
                throw new ConfigurationException($"{definition.Source}: rbd export [{definition.Options.Name}] needs 'exportname = rbd:pool/image' (see docs/rbd.md)");
            }

            if (definition.Backend == "directory" && string.IsNullOrEmpty(definition.Location))
            {
                throw new ConfigurationException($"{definition.Source}: directory export [{definition.Options.Name}] needs 'path = /srv/disks' (which may contain %SESSNAME%)");
            }

            if (definition.Backend == "directory" && !definition.Layers.IsEmpty)
            {
                throw new ConfigurationException($"{definition.Source}: directory export [{definition.Options.Name}] cannot have layers (copyonwrite, cow, partition, offset, length, bitmap, rate, delay_*, error_*, log_requests)");
            }

            if ((definition.Format is not null && definition.Backend is not ("file" or "directory")) || (definition.Snapshot is not null && definition.Backend != "file"))
            {
                throw new ConfigurationException($"{definition.Source}: export [{definition.Options.Name}]: 'format' applies to files and directories, 'snapshot' to a qcow2 file");
            }

            if (definition.Backend is "file" or "memory" or "directory" && definition.Settings.Count > 0)
            {
                var key = definition.Settings.Keys.First();
                throw new ConfigurationException($"{definition.SettingSources[key]}: unknown export key '{key}' (see docs/configuration.md)");
            }
        }
    }

    private static void ApplyGeneric(ServerConfiguration configuration, string key, string value, string where, string directory)
    {
        var server = configuration.Server;
        switch (key.ToLowerInvariant())
        {
            case "port":
                configuration.Port = ParseInt(value, where, key, 0, 65535);
                break;
            case "listenaddr":
                configuration.ListenAddresses = value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                    .Select(a => IPAddress.TryParse(a.Trim('[', ']'), out var address) ? address : throw new ConfigurationException($"{where}: '{a}' is not an IP address"))
                    .ToList();
                break;
            case "unixsock":
                configuration.UnixSocket = value;
                break;
            case "duallisten":
                configuration.DualListen = ParseBool(value, where, key);
                break;
            case "allowlist":
                server.AllowList = ParseBool(value, where, key);
                break;
            case "default":
                configuration.DefaultExport = value;
                break;
            case "maxconnections":
            case "max_connections":
                server.MaxConnections = ParseInt(value, where, key, 1, int.MaxValue);
                break;
            case "handshake_timeout":
                server.HandshakeTimeout = TimeSpan.FromSeconds(ParseInt(value, where, key, 1, 3600));
                break;
            case "shutdown_timeout":
                server.ShutdownTimeout = TimeSpan.FromSeconds(ParseInt(value, where, key, 0, 3600));
                break;
            case "tls_certificates":
                Tls(configuration).CertificateDirectory = ResolvePath(value, directory);
                break;
            case "certfile":
                Tls(configuration).CertificateFile = ResolvePath(value, directory);
                break;
            case "keyfile":
                Tls(configuration).KeyFile = ResolvePath(value, directory);
                break;
            case "cacertfile":
                Tls(configuration).CaFile = ResolvePath(value, directory);
                break;
            case "force_tls":
                if (ParseBool(value, where, key))
                {
                    Tls(configuration).Mode = TlsMode.Require;
                }

                break;
            case "tls":
                Tls(configuration).Mode = ParseTlsMode(value, where, key);
                break;
            case "tls_verify_peer":
                Tls(configuration).VerifyPeer = ParseBool(value, where, key);
                break;
            case "state_dir":
                configuration.StateDirectory = ResolvePath(value, directory);
                break;
            case "user":
                configuration.User = value;
                configuration.UserSource = where;
                break;
            case "group":
                configuration.Group = value;
                configuration.UserSource ??= where;
                break;
            case "control_socket":
                configuration.ControlSocket = ResolvePath(value, directory);
                break;
            case "metrics":
                configuration.MetricsAddress = value;
                break;
            case "list_aliases":
                configuration.ListAliases = ParseBool(value, where, key);
                break;
            case "session_names":
                foreach (var entry in value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
                {
                    server.SessionNames.Add(ParseSessionName(entry, where));
                }

                break;
            case "idle_timeout":
                var idle = ParseInt(value, where, key, 0, 86400 * 365);
                server.IdleTimeout = idle == 0 ? null : TimeSpan.FromSeconds(idle);
                break;
            case "includedir":
                var included = Path.IsPathRooted(value) ? value : Path.Combine(directory, value);
                if (!Directory.Exists(included))
                {
                    throw new ConfigurationException($"{where}: includedir '{included}' does not exist");
                }

                foreach (var file in Directory.GetFiles(included, "*.conf").Order(StringComparer.Ordinal))
                {
                    ReadInto(configuration, file, allowGeneric: false);
                }

                break;
            default:
                if (IgnoredGenericKeys.Contains(key))
                {
                    configuration.Warnings.Add($"{where}: '{key}' has no effect in Spindle and is ignored");
                    break;
                }

                throw new ConfigurationException($"{where}: unknown [generic] key '{key}' (see docs/configuration.md)");
        }
    }

    /// <summary>
    /// One export from <c>key = value</c> pairs, as if read from a section named <paramref name="name"/> (what
    /// <c>spindle ctl add</c> and <c>change</c> send). The same keys, checks and messages as the file.
    /// </summary>
    public static ExportDefinition ParseExport(string name, IEnumerable<KeyValuePair<string, string>> settings, string source)
    {
        var lines = new List<string> { $"[{name}]" };
        foreach (var (key, value) in settings)
        {
            if (key.Contains('=', StringComparison.Ordinal) || key.Contains('\n', StringComparison.Ordinal) || value.Contains('\n', StringComparison.Ordinal))
            {
                throw new ConfigurationException($"{source}: '{key}' is not a configuration key");
            }

            lines.Add($"{key} = {value}");
        }

        var configuration = new ServerConfiguration();
        ParseInto(configuration, lines, source, Directory.GetCurrentDirectory(), allowGeneric: false);
        return configuration.Exports.Single();
    }

    private static void ApplyExport(ServerConfiguration configuration, ExportDefinition export, string key, string value, string where)
    {
        var options = export.Options;
        export.Keys.Add(new KeyValuePair<string, string>(key.ToLowerInvariant(), value));
        switch (key.ToLowerInvariant())
        {
            case "exportname":
            case "path":
                // rbd:pool/[namespace/]image[@snapshot] names a Ceph RBD image (the same form as on the command
                // line and in qemu); anything else is a file or device path.
                if (value.StartsWith(RbdPrefix, StringComparison.Ordinal))
                {
                    export.Backend = "rbd";
                    export.Location = value[RbdPrefix.Length..];
                }
                else
                {
                    export.Location = value;
                }

                break;
            case "backend":
                export.Backend = value.ToLowerInvariant();
                break;
            case "format":
                // raw, qcow2 or auto (docs/qcow2.md): checked here so a typo names its line.
                _ = ImageBackend.ParseFormat(value, where);
                export.Format = value;
                break;
            case "snapshot":
                export.Snapshot = value;
                break;
            case "filesize":
            case "size":
                export.Size = SizeParser.Parse(value, where);
                break;
            case "readonly":
                options.ReadOnly = ParseBool(value, where, key);
                break;
            case "description":
                options.Description = value;
                break;
            case "flush":
            case "fua":
                options.Flush = ParseBool(value, where, key);
                break;
            case "trim":
                options.Trim = ParseBool(value, where, key);
                break;
            case "write_zeroes":
                options.WriteZeroes = ParseBool(value, where, key);
                break;
            case "rotational":
                options.Rotational = ParseBool(value, where, key);
                break;
            case "multiconn":
                options.MultiConn = ParseBool(value, where, key);
                break;
            case "uuid":
                options.Uuid = Guid.TryParse(value, out var uuid) ? uuid : throw new ConfigurationException($"{where}: '{value}' is not a UUID");
                break;
            case "label":
            case "serial":
                if (!ExportIdentity.IsValidTag(value, out var tagProblem))
                {
                    throw new ConfigurationException($"{where}: {key} '{value}' {tagProblem}");
                }

                if (key.Equals("label", StringComparison.OrdinalIgnoreCase))
                {
                    options.Label = value;
                }
                else
                {
                    options.Serial = value;
                }

                break;
            case "prefix":
                export.Prefix = value.Trim('/');
                break;
            case "copyonwrite":
                // nbd-server's meaning: each connection its own overlay, discarded when it disconnects.
                export.Layers.Cow = ParseBool(value, where, key) ? CowMode.PerConnection : CowMode.None;
                break;
            case "cow":
                export.Layers.Cow = ParseBool(value, where, key) ? CowMode.Shared : CowMode.None;
                break;
            case "cowdir":
                export.Layers.CowDirectory = value;
                break;
            case "partition":
                export.Layers.Partition = ParseInt(value, where, key, 1, 128 * 1024);
                break;
            case "offset":
                export.Layers.Offset = SizeParser.Parse(value, where);
                break;
            case "length":
                export.Layers.Length = SizeParser.Parse(value, where);
                break;
            case "rate":
                export.Layers.Rate = PositiveSize(value, where, key);
                break;
            case "rate_burst":
                export.Layers.RateBurst = PositiveSize(value, where, key);
                break;
            case "delay_read":
                export.Layers.DelayRead = TimeSpan.FromMilliseconds(ParseInt(value, where, key, 0, 3_600_000));
                break;
            case "delay_write":
                export.Layers.DelayWrite = TimeSpan.FromMilliseconds(ParseInt(value, where, key, 0, 3_600_000));
                break;
            case "error_rate":
                export.Layers.ErrorRate = LayerSettings.ParseProbability(value, where);
                break;
            case "error_errno":
                export.Layers.ErrorCode = LayerSettings.ParseErrno(value, where);
                break;
            case "error_commands":
                export.Layers.ErrorCommands = LayerSettings.ParseCommands(value, where);
                break;
            case "error_seed":
                export.Layers.ErrorSeed = ParseInt(value, where, key, int.MinValue, int.MaxValue);
                break;
            case "log_requests":
                export.Layers.LogRequests = value;
                break;
            case "bitmap":
            case "bitmaps":
                export.Layers.Bitmaps.AddRange(value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries));
                break;
            case "bitmap_granularity":
            case "bitmap-granularity":
                export.Layers.BitmapGranularity = PositiveSize(value, where, key);
                break;
            case "bitmap_dir":
            case "bitmap-dir":
                export.Layers.BitmapDirectory = value;
                break;
            case "overlay":
                export.Layers.Overlay = value;
                break;
            case "force_tls":
                options.Tls = ParseBool(value, where, key) ? TlsMode.Require : null;
                break;
            case "tls":
                options.Tls = ParseTlsMode(value, where, key);
                break;
            case "authfile":
                var authfile = AddressList(() => ExportAccess.FromAuthFile(value, where));
                options.Access = authfile is null ? options.Access : Merge(options.Access, authfile.Addresses, authfile.AllowUnix, null);
                break;
            case "allow":
                var (rules, unix) = AddressList(() => ExportAccess.ParseAddresses(value.Split(',', StringSplitOptions.TrimEntries), where));
                options.Access = Merge(options.Access, rules, unix, null);
                break;
            case "allow_identities":
                options.Access = Merge(options.Access, null, false, value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries));
                break;
            case "maxconnections":
            case "max_connections":
                options.MaxConnections = ParseInt(value, where, key, 1, int.MaxValue);
                break;
            case "minblocksize":
            case "preferredblocksize":
            case "maxblocksize":
                var sizes = options.BlockSizes ?? BlockSizeConstraints.Default;
                var number = (uint)ParseInt(value, where, key, 1, int.MaxValue);
                options.BlockSizes = key.ToLowerInvariant() switch
                {
                    "minblocksize" => sizes with { Minimum = number },
                    "preferredblocksize" => sizes with { Preferred = number },
                    _ => sizes with { Maximum = number },
                };
                break;
            default:
                if (RefusedExportKeys.Contains(key))
                {
                    throw new ConfigurationException($"{where}: nbd-server's '{key}' is not supported by Spindle; remove it (serving without it would change how data is handled)");
                }

                if (IgnoredExportKeys.Contains(key))
                {
                    configuration.Warnings.Add($"{where}: '{key}' has no effect in Spindle and is ignored");
                    break;
                }

                // Backend-specific settings (for example conf, id, keyring for rbd) are passed through. Whether the
                // backend takes any is only known once the whole section is read (the key may come before
                // 'exportname = rbd:...'), so the check waits until then.
                export.Settings[key] = value;
                export.SettingSources[key] = where;
                break;
        }
    }

    /// <summary>Parses <c>NAME=ADDRESS[/PREFIX]</c> (or <c>NAME=unix</c>): the session name given to clients from there.</summary>
    public static SessionName ParseSessionName(string entry, string where)
    {
        var equals = entry.IndexOf('=', StringComparison.Ordinal);
        if (equals <= 0)
        {
            throw new ConfigurationException($"{where}: session name '{entry}' must be NAME=ADDRESS (for example alice=10.0.0.5 or ops=10.1.0.0/16)");
        }

        var name = entry[..equals].Trim();
        if (!DirectoryExportProvider.IsSafeSessionName(name, out var problem))
        {
            throw new ConfigurationException($"{where}: {problem}");
        }

        var (rules, unix) = AddressList(() => ExportAccess.ParseAddresses([entry[(equals + 1)..]], where));
        return new SessionName(name, new ExportAccess { Addresses = rules, AllowUnix = unix });
    }

    private static TlsSettings Tls(ServerConfiguration configuration) => configuration.Tls ??= new TlsSettings();

    private static string ResolvePath(string value, string directory) => Path.IsPathRooted(value) ? value : Path.Combine(directory, value);

    private static TlsMode ParseTlsMode(string value, string where, string key) => value.ToLowerInvariant() switch
    {
        "off" or "false" or "no" => TlsMode.Off,
        "on" or "true" or "yes" => TlsMode.On,
        "require" or "required" => TlsMode.Require,
        _ => throw new ConfigurationException($"{where}: '{key}' must be off, on or require, not '{value}'"),
    };

    /// <summary>Adds address rules or identities to an export's access rules (several keys may contribute).</summary>
    private static ExportAccess Merge(ExportAccess? access, IReadOnlyList<AddressRule>? addresses, bool allowUnix, IReadOnlyList<string>? identities) => new()
    {
        Addresses = addresses is null ? access?.Addresses : [.. access?.Addresses ?? [], .. addresses],
        AllowUnix = (access?.AllowUnix ?? false) || allowUnix,
        Identities = identities is null ? access?.Identities : [.. access?.Identities ?? [], .. identities],
    };

    private static long PositiveSize(string value, string where, string key)
    {
        var size = SizeParser.Parse(value, where);
        return size > 0 ? size : throw new ConfigurationException($"{where}: '{key}' must be more than 0");
    }

    private static bool ParseBool(string value, string where, string key) => value.ToLowerInvariant() switch
    {
        "true" or "yes" or "on" or "1" => true,
        "false" or "no" or "off" or "0" => false,
        _ => throw new ConfigurationException($"{where}: '{key}' must be true or false, not '{value}'"),
    };

    private static int ParseInt(string value, string where, string key, int minimum, int maximum)
    {
        if (!int.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out var number) || number < minimum || number > maximum)
        {
            throw new ConfigurationException($"{where}: '{key}' must be a whole number from {minimum} to {maximum}, not '{value}'");
        }

        return number;
    }

    /// <summary>Address lists are parsed by the server library, which reports a bad entry as a format error.</summary>
    private static T AddressList<T>(Func<T> parse)
    {
        try
        {
            return parse();
        }
        catch (FormatException exception)
        {
            throw new ConfigurationException(exception.Message, exception);
        }
    }
}
