using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;

namespace Spindle.Server.Security;

/// <summary>An IP address or CIDR range, as written in an allow list or an nbd-server authfile.</summary>
public sealed record AddressRule(IPAddress Network, int PrefixLength)
{
    /// <summary>Parses <c>10.0.0.5</c>, <c>10.0.0.0/8</c>, <c>::1</c>, <c>fd00::/8</c>.</summary>
    public static bool TryParse(string text, out AddressRule? rule)
    {
        rule = null;
        var slash = text.IndexOf('/', StringComparison.Ordinal);
        var addressText = (slash < 0 ? text : text[..slash]).Trim().Trim('[', ']');
        if (!IPAddress.TryParse(addressText, out var address))
        {
            return false;
        }

        address = Normalize(address);
        var bits = address.AddressFamily == AddressFamily.InterNetwork ? 32 : 128;
        var prefix = bits;
        if (slash >= 0 && (!int.TryParse(text[(slash + 1)..].Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out prefix) || prefix < 0 || prefix > bits))
        {
            return false;
        }

        rule = new AddressRule(address, prefix);
        return true;
    }

    public bool Matches(IPAddress address)
    {
        address = Normalize(address);
        if (address.AddressFamily != Network.AddressFamily)
        {
            return false;
        }

        Span<byte> candidate = stackalloc byte[16];
        Span<byte> network = stackalloc byte[16];
        address.TryWriteBytes(candidate, out var length);
        Network.TryWriteBytes(network, out _);
        var whole = PrefixLength / 8;
        if (!candidate[..whole].SequenceEqual(network[..whole]))
        {
            return false;
        }

        var rest = PrefixLength % 8;
        if (rest == 0 || whole >= length)
        {
            return true;
        }

        var mask = (byte)(0xff << (8 - rest));
        return (candidate[whole] & mask) == (network[whole] & mask);
    }

    public override string ToString() => $"{Network}/{PrefixLength}";

    /// <summary>IPv4 clients of a dual-stack socket appear as ::ffff:a.b.c.d; rules are written with a.b.c.d.</summary>
    public static IPAddress Normalize(IPAddress address) => address.IsIPv4MappedToIPv6 ? address.MapToIPv4() : address;
}

/// <summary>Who may use an export: addresses (with <c>unix</c> for Unix-socket clients) and TLS identities.</summary>
public sealed class ExportAccess
{
    /// <summary>Allowed client addresses; null allows every address.</summary>
    public IReadOnlyList<AddressRule>? Addresses { get; init; }

    /// <summary>Whether Unix-socket clients pass the address list (written <c>unix</c> in it).</summary>
    public bool AllowUnix { get; init; }

    /// <summary>Allowed TLS identities (certificate CN, DNS SAN or full subject); null allows any client.</summary>
    public IReadOnlyList<string>? Identities { get; init; }

    /// <summary>
    /// Parses an allow list: comma- or line-separated addresses, CIDR ranges and the word <c>unix</c>.
    /// </summary>
    public static (IReadOnlyList<AddressRule> Rules, bool AllowUnix) ParseAddresses(IEnumerable<string> entries, string where)
    {
        var rules = new List<AddressRule>();
        var unix = false;
        foreach (var raw in entries)
        {
            var entry = raw.Trim();
            if (entry.Length == 0 || entry.StartsWith('#'))
            {
                continue;
            }

            if (entry.Equals("unix", StringComparison.OrdinalIgnoreCase))
            {
                unix = true;
            }
            else if (AddressRule.TryParse(entry, out var rule))
            {
                rules.Add(rule!);
            }
            else
            {
                throw new FormatException($"{where}: '{entry}' is not an IP address, a CIDR range or 'unix'");
            }
        }

        return (rules, unix);
    }

    /// <summary>
    /// Reads an nbd-server authfile: one address or CIDR range per line, # comments. As in nbd-server, a missing
    /// file allows everyone and an empty file allows no one.
    /// </summary>
    public static ExportAccess? FromAuthFile(string path, string where)
    {
        if (!File.Exists(path))
        {
            return null;
        }

        var (rules, unix) = ParseAddresses(File.ReadAllLines(path), $"{where} ({path})");
        return new ExportAccess { Addresses = rules, AllowUnix = unix };
    }

    /// <summary>Checks a client; on refusal <paramref name="rule"/> names what refused it, for the log.</summary>
    public bool Allows(IPEndPoint? remote, ClientIdentity? identity, out string rule)
    {
        if (Addresses is not null)
        {
            if (remote is null)
            {
                if (!AllowUnix)
                {
                    rule = "address allow list (Unix-socket clients need 'unix' in it)";
                    return false;
                }
            }
            else if (!Addresses.Any(a => a.Matches(remote.Address)))
            {
                rule = $"address allow list [{string.Join(", ", Addresses)}]";
                return false;
            }
        }

        if (Identities is not null && (identity is null || !Identities.Any(identity.Matches)))
        {
            rule = identity is null
                ? "TLS identity allow list (the client presented no certificate)"
                : $"TLS identity allow list [{string.Join(", ", Identities)}] (client is {identity})";
            return false;
        }

        rule = string.Empty;
        return true;
    }
}

/// <summary>The verified identity of a TLS client, from its certificate.</summary>
public sealed record ClientIdentity(string Subject, string? CommonName, IReadOnlyList<string> DnsNames)
{
    public static ClientIdentity FromCertificate(X509Certificate2 certificate)
    {
        ArgumentNullException.ThrowIfNull(certificate);
        var commonName = certificate.GetNameInfo(X509NameType.SimpleName, forIssuer: false);
        var dns = new List<string>();
        foreach (var extension in certificate.Extensions)
        {
            if (extension is X509SubjectAlternativeNameExtension san)
            {
                dns.AddRange(san.EnumerateDnsNames());
            }
        }

        return new ClientIdentity(certificate.SubjectName.Name, string.IsNullOrEmpty(commonName) ? null : commonName, dns);
    }

    /// <summary>A rule matches the common name, a DNS subject alternative name, or the whole subject.</summary>
    public bool Matches(string rule) =>
        string.Equals(rule, CommonName, StringComparison.OrdinalIgnoreCase) ||
        DnsNames.Any(d => string.Equals(rule, d, StringComparison.OrdinalIgnoreCase)) ||
        string.Equals(rule.Replace(", ", ",", StringComparison.Ordinal), Subject.Replace(", ", ",", StringComparison.Ordinal), StringComparison.OrdinalIgnoreCase);

    public override string ToString() => CommonName ?? Subject;
}
