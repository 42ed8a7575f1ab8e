using System.Globalization;
using System.Net;
using Spindle.Protocol;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Server.Security;

namespace Spindle.Cli.Hosting;

/// <summary>What one export is served from, as written in a configuration file or on the command line.</summary>
public sealed class ExportDefinition
{
    public required ExportOptions Options { get; init; }

    /// <summary>The backend kind: "file" (a file or block device), "memory", or another registered kind such as "rbd".</summary>
    public string Backend { get; set; } = "file";

    /// <summary>The file, device or backend-specific location (for "file": the path).</summary>
    public string? Location { get; set; }

    /// <summary>For "memory" the size; for "file" the size to create a missing file with (nbd-server's filesize).</summary>
    public long? Size { get; set; }

    /// <summary>Backend-specific keys (for example an RBD export's conf, id and keyring).</summary>
    public Dictionary<string, string> Settings { get; } = new(StringComparer.OrdinalIgnoreCase);

    /// <summary>Where each of <see cref="Settings"/> was written (file:line), for error messages.</summary>
    public Dictionary<string, string> SettingSources { get; } = new(StringComparer.OrdinalIgnoreCase);

    /// <summary>For "file" and "directory": raw, qcow2, or null/auto to detect it from the file's first bytes.</summary>
    public string? Format { get; set; }

    /// <summary>For "file": the qcow2 internal snapshot to serve (read-only), by id or name.</summary>
    public string? Snapshot { get; set; }

    /// <summary>For "directory": the prefix of its export names (default: the section name).</summary>
    public string? Prefix { get; set; }

    /// <summary>Where it was defined, for error messages.</summary>
    public string Source { get; set; } = "command line";

    /// <summary>The layers stacked on the backend (overlay, partition or range); none by default.</summary>
    public LayerSettings Layers { get; } = new();

    /// <summary>The section's <c>key = value</c> lines as written (keys lower-cased), in order: what a reload compares.</summary>
    public List<KeyValuePair<string, string>> Keys { get; } = [];

    /// <summary>
    /// What the device depends on: a reload that changes only other keys keeps the device open (and the clients'
    /// data where it is, for a memory disk) and gives new connections the new options.
    /// </summary>
    public string DeviceFingerprint =>
        string.Join("\n", new[] { Backend, Location ?? string.Empty, Size?.ToString(CultureInfo.InvariantCulture) ?? string.Empty, Options.ReadOnly ? "ro" : "rw", Prefix ?? string.Empty, Format ?? string.Empty, Snapshot ?? string.Empty, Layers.Fingerprint }
            .Concat(Settings.OrderBy(pair => pair.Key, StringComparer.OrdinalIgnoreCase).Select(pair => pair.Key + "=" + pair.Value)));

    /// <summary>Everything about the export: two definitions with the same fingerprint serve the same thing the same way.</summary>
    public string Fingerprint =>
        DeviceFingerprint + "\n--\n" + string.Join("\n", Keys.Select(pair => pair.Key + "=" + pair.Value).Order(StringComparer.Ordinal));
}

/// <summary>Where the server's certificates are and how TLS is used, before they are loaded.</summary>
public sealed class TlsSettings
{
    /// <summary>A directory with server-cert.pem, server-key.pem and optionally ca-cert.pem (nbdkit/qemu/libnbd layout).</summary>
    public string? CertificateDirectory { get; set; }

    /// <summary>nbd-server's certfile, keyfile and cacertfile, used instead of (or over) the directory.</summary>
    public string? CertificateFile { get; set; }

    public string? KeyFile { get; set; }

    public string? CaFile { get; set; }

    /// <summary>Server-wide mode; default <see cref="TlsMode.On"/> once certificates are configured.</summary>
    public TlsMode Mode { get; set; } = TlsMode.On;

    /// <summary>Require a client certificate signed by the CA from every client.</summary>
    public bool VerifyPeer { get; set; }

    public TlsOptions Load()
    {
        var directory = CertificateDirectory is null ? null : Path.GetFullPath(CertificateDirectory);
        var certificate = CertificateFile ?? (directory is null ? null : Path.Combine(directory, "server-cert.pem"));
        var key = KeyFile ?? (directory is null ? null : Path.Combine(directory, "server-key.pem"));
        var ca = CaFile ?? (directory is null ? null : Path.Combine(directory, "ca-cert.pem"));
        if (certificate is null || key is null)
        {
            throw new ConfigurationException("TLS needs a certificate and its key: tls_certificates = DIR (with server-cert.pem and server-key.pem), or certfile and keyfile");
        }

        foreach (var file in new[] { certificate, key })
        {
            if (!File.Exists(file))
            {
                throw new ConfigurationException($"TLS: {file} does not exist (scripts/make-certs.sh DIR makes a CA, server and client certificates)");
            }
        }

        if (VerifyPeer && (ca is null || !File.Exists(ca)))
        {
            throw new ConfigurationException($"TLS: client certificates are required but there is no CA to check them against ({ca ?? "cacertfile"})");
        }

        try
        {
            var (serverCertificate, chain) = TlsOptions.LoadCertificate(certificate, key);
            System.Security.Cryptography.X509Certificates.X509Certificate2Collection? authorities = null;
            if (ca is not null && File.Exists(ca))
            {
                authorities = [];
                authorities.ImportFromPemFile(ca);
            }

            return new TlsOptions
            {
                Certificate = serverCertificate,
                Chain = chain,
                ClientCertificateAuthorities = authorities,
                RequireClientCertificate = VerifyPeer,
                Mode = Mode,
            };
        }
        catch (Exception exception) when (exception is System.Security.Cryptography.CryptographicException or InvalidDataException or IOException)
        {
            throw new ConfigurationException($"TLS: cannot load {certificate} with {key}: {exception.Message}");
        }
    }
}

/// <summary>A whole server configuration: server options plus export definitions.</summary>
public sealed class ServerConfiguration
{
    public ServerOptions Server { get; } = new();

    public List<ExportDefinition> Exports { get; } = [];

    /// <summary>The export served to clients asking for the empty name (the <c>default</c> key of [generic]).</summary>
    public string? DefaultExport { get; set; }

    /// <summary>Notes about keys that were accepted but have no effect (for example nbd-server's <c>user</c>).</summary>
    public List<string> Warnings { get; } = [];

    /// <summary>TLS settings from [generic] (or the command line), loaded into <see cref="ServerOptions.Tls"/> by <see cref="LoadTls"/>.</summary>
    public TlsSettings? Tls { get; set; }

    /// <summary>Loads the certificates named by <see cref="Tls"/> into the server options; a clear error if they cannot be used.</summary>
    public void LoadTls()
    {
        if (Tls is null || Tls.Mode == TlsMode.Off)
        {
            Server.Tls = null;
            if (Exports.Any(e => e.Options.Tls == TlsMode.Require))
            {
                throw new ConfigurationException("an export requires TLS but no certificate is configured (tls_certificates = DIR, or certfile and keyfile)");
            }

            return;
        }

        Server.Tls = Tls.Load();
    }

    /// <summary>Where export UUIDs that cannot live in a file attribute are kept ([generic] state_dir).</summary>
    public string? StateDirectory { get; set; }

    /// <summary>[generic] list_aliases: whether LIST shows by-uuid/, by-label/ and by-serial/ names too.</summary>
    public bool ListAliases { get; set; }

    /// <summary>[generic] user: the user to run as once the sockets are bound and the exports opened (nbd-server's key).</summary>
    public string? User { get; set; }

    /// <summary>[generic] group: the group to run as (default: the user's primary group).</summary>
    public string? Group { get; set; }

    /// <summary>Where <see cref="User"/> and <see cref="Group"/> were set, for error messages.</summary>
    public string? UserSource { get; set; }

    /// <summary>[generic] control_socket: the Unix socket of <c>spindle ctl</c> (default: none).</summary>
    public string? ControlSocket { get; set; }

    /// <summary>[generic] metrics: ADDR:PORT of the Prometheus endpoint and status page (default: none).</summary>
    public string? MetricsAddress { get; set; }

    /// <summary>[generic] port; default 10809.</summary>
    public int? Port { get; set; }

    /// <summary>[generic] listenaddr; default every interface.</summary>
    public List<IPAddress>? ListenAddresses { get; set; }

    /// <summary>[generic] unixsock: listen on this Unix socket (and not on TCP unless <see cref="DualListen"/>).</summary>
    public string? UnixSocket { get; set; }

    /// <summary>[generic] duallisten: with unixsock, listen on TCP as well.</summary>
    public bool DualListen { get; set; }

    /// <summary>Turns the listening keys into <see cref="ServerOptions.Endpoints"/>, as nbd-server would listen.</summary>
    public void ResolveEndpoints()
    {
        Server.Endpoints.Clear();
        if (UnixSocket is not null)
        {
            Server.Endpoints.Add(new ListenEndpoint.Unix(UnixSocket));
            if (!DualListen)
            {
                return;
            }
        }

        var port = Port ?? NbdLimits.DefaultPort;
        var addresses = ListenAddresses ?? [IPAddress.IPv6Any];
        foreach (var address in addresses.Distinct())
        {
            // nbd-server's usual "::, 0.0.0.0": the dual-stack [::] socket already takes IPv4, and a second bind of
            // 0.0.0.0 on the same port would fail.
            if (address.Equals(IPAddress.Any) && addresses.Contains(IPAddress.IPv6Any))
            {
                continue;
            }

            Server.Endpoints.Add(new ListenEndpoint.Tcp(address, port));
        }
    }
}

/// <summary>A configuration that cannot be used, with the file and line at fault.</summary>
public sealed class ConfigurationException : Exception
{
    public ConfigurationException(string message)
        : base(message)
    {
    }

    public ConfigurationException()
    {
    }

    public ConfigurationException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}

/// <summary>Parses sizes such as <c>1G</c>, <c>512M</c>, <c>4096</c>, <c>10GiB</c>. Suffixes are powers of 1024.</summary>
public static class SizeParser
{
    public static long Parse(string text, string where = "size")
    {
        if (TryParse(text, out var size))
        {
            return size;
        }

        throw new ConfigurationException($"{where}: '{text}' is not a size (examples: 4096, 512M, 1G, 2T)");
    }

    public static bool TryParse(string? text, out long size)
    {
        size = 0;
        if (string.IsNullOrWhiteSpace(text))
        {
            return false;
        }

        var s = text.Trim();
        var end = s.Length;
        if (s.EndsWith("iB", StringComparison.OrdinalIgnoreCase))
        {
            end -= 2;
        }
        else if (s.EndsWith('B') || s.EndsWith('b'))
        {
            end -= 1;
        }

        var shift = 0;
        if (end > 0)
        {
            shift = char.ToUpperInvariant(s[end - 1]) switch
            {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => 0,
            };
            if (shift > 0)
            {
                end--;
            }
        }

        if (!decimal.TryParse(s.AsSpan(0, end), NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out var number) || number < 0)
        {
            return false;
        }

        var multiplier = 1L << shift;
        if (number > long.MaxValue / multiplier)
        {
            return false;
        }

        var bytes = number * multiplier;
        if (bytes != decimal.Truncate(bytes))
        {
            return false;
        }

        size = (long)bytes;
        return true;
    }
}
