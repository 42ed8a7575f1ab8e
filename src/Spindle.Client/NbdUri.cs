using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace Spindle.Client;

/// <summary>How an NBD URI reaches its server.</summary>
public enum NbdTransportKind
{
    /// <summary>TCP/IP to host:port (<c>nbd://</c>, <c>nbds://</c>).</summary>
    Tcp,

    /// <summary>A Unix domain socket (<c>nbd+unix://</c>, <c>nbds+unix://</c>).</summary>
    Unix,
}

/// <summary>
/// An NBD URI as NetworkBlockDevice/nbd <c>doc/uri.md</c> defines it: <c>nbd://[user@]host[:port]/export</c>,
/// <c>nbd+unix:///export?socket=PATH</c> and their TLS forms <c>nbds://</c> and <c>nbds+unix://</c>.
/// </summary>
/// <remarks>
/// <para>The export name is the path without its one leading <c>/</c>, percent-decoded: <c>nbd://h/disk</c> is
/// "disk", <c>nbd://h</c> and <c>nbd://h/</c> are "", <c>nbd://h//disk</c> is "/disk". The parser is written from
/// RFC 3986 rather than <see cref="Uri"/>, which would normalise exactly the paths (<c>//</c>, <c>.</c>, <c>..</c>)
/// that carry an export name.</para>
/// <para>Query parameters: <c>socket</c> (required for the Unix schemes, may start with <c>%00</c> for an abstract
/// socket), the TLS parameters <c>tls-type</c>, <c>tls-hostname</c>, <c>tls-verify-peer</c> and libnbd's
/// <c>tls-certificates</c>, and experimental <c>x-*</c> parameters (kept, ignored). Anything else is diagnosed as the
/// spec asks.</para>
/// </remarks>
public sealed record NbdUri
{
    /// <summary>The IANA port, used when the URI names none.</summary>
    public const int DefaultPort = 10809;

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>The scheme, lower case: nbd, nbds, nbd+unix or nbds+unix.</summary>
    public required string Scheme { get; init; }

    public NbdTransportKind Transport { get; init; }

    /// <summary>True for <c>nbds</c> and <c>nbds+unix</c>: the connection MUST use TLS or fail.</summary>
    public bool RequiresTls { get; init; }

    /// <summary>The userinfo of the authority (a TLS PSK user name), if any.</summary>
    public string? User { get; init; }

    /// <summary>The host name or IP address (IPv6 without brackets) for TCP; null for Unix sockets.</summary>
    public string? Host { get; init; }

    public int Port { get; init; } = DefaultPort;

    /// <summary>The socket path for the Unix schemes. A leading NUL names a Linux abstract socket.</summary>
    public string? SocketPath { get; init; }

    /// <summary>The export name: the decoded path without its leading slash.</summary>
    public string ExportName { get; init; } = string.Empty;

    public string? TlsType { get; init; }

    public string? TlsHostname { get; init; }

    public bool? TlsVerifyPeer { get; init; }

    /// <summary>
    /// <c>tls-certificates=DIR</c> (libnbd's extension): ca-cert.pem to check the server, client-cert.pem and
    /// client-key.pem for a client certificate.
    /// </summary>
    public string? TlsCertificates { get; init; }

    /// <summary>Experimental <c>x-*</c> query parameters, as given.</summary>
    public IReadOnlyDictionary<string, string> ExperimentalParameters { get; init; } = new Dictionary<string, string>();

    /// <summary>Where the URI points, for messages: "host:port" or "unix:PATH".</summary>
    public string Target => Transport == NbdTransportKind.Unix
        ? "unix:" + (SocketPath ?? string.Empty).Replace("\0", "@", StringComparison.Ordinal)
        : (Host!.Contains(':', StringComparison.Ordinal) ? $"[{Host}]" : Host) + ":" + Port.ToString(CultureInfo.InvariantCulture);

    /// <summary>True if <paramref name="text"/> starts with one of the NBD schemes (any case), so it is not a file name.</summary>
    public static bool LooksLikeUri(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var colon = text.IndexOf(':', StringComparison.Ordinal);
        if (colon <= 0)
        {
            return false;
        }

        var scheme = text[..colon].ToLowerInvariant();
        return scheme is "nbd" or "nbds" or "nbd+unix" or "nbds+unix" or "nbd+vsock" or "nbds+vsock" or "nbd+ssh" or "nbds+ssh";
    }

    /// <summary>Parses an NBD URI.</summary>
    /// <exception cref="FormatException">The text is not a valid NBD URI; the message says what is wrong.</exception>
    public static NbdUri Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        if (!TryParse(text, out var uri, out var error))
        {
            throw new FormatException($"invalid NBD URI '{text}': {error}");
        }

        return uri!;
    }

    /// <summary>Parses an NBD URI, returning a description of the problem instead of throwing.</summary>
    public static bool TryParse(string text, out NbdUri? uri, out string? error)
    {
        ArgumentNullException.ThrowIfNull(text);
        uri = null;
        error = Validate(text);
        if (error is not null)
        {
            return false;
        }

        var colon = text.IndexOf(':', StringComparison.Ordinal);
        if (colon <= 0)
        {
            error = "no scheme (an NBD URI starts with nbd://, nbds://, nbd+unix:// or nbds+unix://)";
            return false;
        }

        var scheme = text[..colon].ToLowerInvariant();
        NbdTransportKind transport;
        bool tls;
        switch (scheme)
        {
            case "nbd":
                (transport, tls) = (NbdTransportKind.Tcp, false);
                break;
            case "nbds":
                (transport, tls) = (NbdTransportKind.Tcp, true);
                break;
            case "nbd+unix":
                (transport, tls) = (NbdTransportKind.Unix, false);
                break;
            case "nbds+unix":
                (transport, tls) = (NbdTransportKind.Unix, true);
                break;
            case "nbd+vsock" or "nbds+vsock" or "nbd+ssh" or "nbds+ssh":
                error = $"the {scheme} scheme (a libnbd extension) is not supported: use nbd://, nbds://, nbd+unix:// or nbds+unix://";
                return false;
            default:
                error = $"unknown scheme '{scheme}' (an NBD URI starts with nbd://, nbds://, nbd+unix:// or nbds+unix://)";
                return false;
        }

        var rest = text[(colon + 1)..];
        var hash = rest.IndexOf('#', StringComparison.Ordinal);
        if (hash >= 0)
        {
            error = "NBD URIs have no fragment: write '#' in an export name as %23";
            return false;
        }

        string? query = null;
        var question = rest.IndexOf('?', StringComparison.Ordinal);
        if (question >= 0)
        {
            query = rest[(question + 1)..];
            rest = rest[..question];
        }

        string? authority = null;
        string path;
        if (rest.StartsWith("//", StringComparison.Ordinal))
        {
            var slash = rest.IndexOf('/', 2);
            authority = slash < 0 ? rest[2..] : rest[2..slash];
            path = slash < 0 ? string.Empty : rest[slash..];
        }
        else
        {
            path = rest;
        }

        if (path.Length > 0 && path[0] != '/')
        {
            error = $"the export path '{path}' must start with '/' (write nbd://HOST/EXPORT)";
            return false;
        }

        if (!TryDecode(path.Length > 0 ? path[1..] : string.Empty, allowNul: false, out var exportName, out error))
        {
            error = "export name: " + error;
            return false;
        }

        if (Encoding.UTF8.GetByteCount(exportName) > Protocol.NbdLimits.MaxStringLength)
        {
            error = "the export name is longer than the protocol's 4096-byte limit";
            return false;
        }

        string? user = null;
        string? host = null;
        var port = DefaultPort;
        if (!string.IsNullOrEmpty(authority) && !TryParseAuthority(authority, out user, out host, out port, out error))
        {
            return false;
        }

        if (!TryParseQuery(query, out var parameters, out error))
        {
            return false;
        }

        parameters.Remove("socket", out var socket);
        parameters.Remove("tls-type", out var tlsType);
        parameters.Remove("tls-hostname", out var tlsHostname);
        parameters.Remove("tls-certificates", out var tlsCertificates);
        if (parameters.ContainsKey("tls-psk-file"))
        {
            error = "tls-psk-file is not supported: .NET's TLS has no pre-shared keys; use X.509 certificates (tls-certificates=DIR)";
            return false;
        }

        if (tlsCertificates is { Length: 0 })
        {
            error = "tls-certificates needs a directory (tls-certificates=DIR)";
            return false;
        }
        bool? verifyPeer = null;
        if (parameters.Remove("tls-verify-peer", out var verifyText))
        {
            verifyPeer = verifyText.ToLowerInvariant() switch
            {
                "1" or "true" or "yes" or "on" => true,
                "0" or "false" or "no" or "off" => false,
                _ => null,
            };
            if (verifyPeer is null)
            {
                error = $"tls-verify-peer must be 0 or 1, not '{verifyText}'";
                return false;
            }
        }

        if (tlsType is not null && tlsType is not ("anon" or "x509" or "psk"))
        {
            error = $"tls-type must be anon, x509 or psk, not '{tlsType}'";
            return false;
        }

        var experimental = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (key, value) in parameters)
        {
            if (!key.StartsWith("x-", StringComparison.Ordinal))
            {
                error = $"unknown query parameter '{key}' (NBD URIs know socket, tls-type, tls-hostname, tls-verify-peer, tls-certificates and experimental x-* parameters)";
                return false;
            }

            experimental[key] = value;
        }

        if (transport == NbdTransportKind.Unix)
        {
            if (!string.IsNullOrEmpty(host) || user is not null)
            {
                error = $"a {scheme} URI names its socket with ?socket=PATH and has no host (write {scheme}:///EXPORT?socket=PATH)";
                return false;
            }

            if (string.IsNullOrEmpty(socket))
            {
                error = $"a {scheme} URI needs ?socket=PATH";
                return false;
            }
        }
        else
        {
            if (socket is not null)
            {
                error = $"?socket= is only for nbd+unix:// and nbds+unix:// URIs (write nbd+unix:///EXPORT?socket={socket})";
                return false;
            }

            if (string.IsNullOrEmpty(host))
            {
                error = $"no host (write {scheme}://HOST[:PORT]/EXPORT, or nbd+unix:///EXPORT?socket=PATH for a Unix socket)";
                return false;
            }
        }

        uri = new NbdUri
        {
            Scheme = scheme,
            Transport = transport,
            RequiresTls = tls,
            User = user,
            Host = transport == NbdTransportKind.Tcp ? host : null,
            Port = port,
            SocketPath = socket,
            ExportName = exportName,
            TlsType = tlsType,
            TlsHostname = tlsHostname,
            TlsVerifyPeer = verifyPeer,
            TlsCertificates = tlsCertificates,
            ExperimentalParameters = experimental,
        };
        return true;
    }

    /// <summary>An <c>nbd://</c> URI for a TCP endpoint.</summary>
    public static NbdUri ForTcp(string host, int port, string exportName = "") => new()
    {
        Scheme = "nbd",
        Transport = NbdTransportKind.Tcp,
        Host = host,
        Port = port,
        ExportName = exportName,
    };

    /// <summary>An <c>nbd+unix://</c> URI for a Unix socket.</summary>
    public static NbdUri ForUnixSocket(string socketPath, string exportName = "") => new()
    {
        Scheme = "nbd+unix",
        Transport = NbdTransportKind.Unix,
        SocketPath = socketPath,
        ExportName = exportName,
    };

    /// <summary>The same server with another export name.</summary>
    public NbdUri WithExportName(string exportName) => this with { ExportName = exportName };

    /// <summary>The endpoint to connect to (DNS names are resolved at connect time).</summary>
    public EndPoint ToEndPoint() => Transport switch
    {
        NbdTransportKind.Unix => new UnixDomainSocketEndPoint(SocketPath!),
        _ when IPAddress.TryParse(Host, out var address) => new IPEndPoint(address, Port),
        _ => new DnsEndPoint(Host!, Port),
    };

    /// <summary>The canonical text of the URI: the same string qemu or nbdinfo accept.</summary>
    public override string ToString()
    {
        var builder = new StringBuilder();
        builder.Append(Scheme).Append("://");
        if (Transport == NbdTransportKind.Tcp)
        {
            if (User is not null)
            {
                builder.Append(Escape(User, keepSlash: false, userInfo: true)).Append('@');
            }

            // Decoded text goes back out escaped: a host may hold any character its percent-encoding spelled (a space,
            // '@', ':', a zone id's '%'), and only an IPv6 literal goes in brackets.
            builder.Append(IPAddress.TryParse(Host, out var address) && address.AddressFamily == AddressFamily.InterNetworkV6
                ? $"[{Escape(Host!, keepSlash: false)}]"
                : Escape(Host!, keepSlash: false, userInfo: true));
            if (Port != DefaultPort)
            {
                builder.Append(':').Append(Port.ToString(CultureInfo.InvariantCulture));
            }
        }

        builder.Append('/').Append(Escape(ExportName, keepSlash: true));
        var separator = '?';
        void Parameter(string key, string? value)
        {
            if (value is not null)
            {
                builder.Append(separator).Append(Escape(key, keepSlash: true)).Append('=').Append(Escape(value, keepSlash: true));
                separator = '&';
            }
        }

        Parameter("socket", SocketPath);
        Parameter("tls-type", TlsType);
        Parameter("tls-hostname", TlsHostname);
        Parameter("tls-verify-peer", TlsVerifyPeer is null ? null : TlsVerifyPeer.Value ? "1" : "0");
        Parameter("tls-certificates", TlsCertificates);
        foreach (var (key, value) in ExperimentalParameters)
        {
            Parameter(key, value);
        }

        return builder.ToString();
    }

    private static string? Validate(string text)
    {
        if (text.Length == 0)
        {
            return "empty";
        }

        foreach (var c in text)
        {
            if (c <= ' ' || c == 0x7f)
            {
                return c == ' '
                    ? "contains a space (percent-encode it as %20)"
                    : $"contains the control character U+{(int)c:X4} (percent-encode it)";
            }
        }

        return null;
    }

    private static bool TryParseAuthority(string authority, out string? user, out string? host, out int port, out string? error)
    {
        user = null;
        host = null;
        port = DefaultPort;
        var at = authority.LastIndexOf('@');
        if (at >= 0)
        {
            if (!TryDecode(authority[..at], allowNul: false, out var decodedUser, out error))
            {
                error = "user: " + error;
                return false;
            }

            user = decodedUser;
            authority = authority[(at + 1)..];
        }

        string portText;
        if (authority.StartsWith('['))
        {
            var close = authority.IndexOf(']', StringComparison.Ordinal);
            if (close < 0)
            {
                error = "an IPv6 address opened with '[' has no ']'";
                return false;
            }

            var literal = authority[1..close];
            if (!TryDecode(literal, allowNul: false, out var decodedLiteral, out error) ||
                !IPAddress.TryParse(decodedLiteral, out var address) || address.AddressFamily != AddressFamily.InterNetworkV6)
            {
                error = $"'[{literal}]' is not an IPv6 address";
                return false;
            }

            host = decodedLiteral;
            var after = authority[(close + 1)..];
            if (after.Length > 0 && after[0] != ':')
            {
                error = $"unexpected '{after}' after the IPv6 address (write [ADDRESS]:PORT)";
                return false;
            }

            portText = after.Length > 0 ? after[1..] : string.Empty;
        }
        else
        {
            var lastColon = authority.LastIndexOf(':');
            var hostText = lastColon >= 0 ? authority[..lastColon] : authority;
            portText = lastColon >= 0 ? authority[(lastColon + 1)..] : string.Empty;
            if (hostText.Contains(':', StringComparison.Ordinal))
            {
                error = $"'{authority}' looks like an IPv6 address: put it in brackets, nbd://[{hostText}]:PORT/EXPORT";
                return false;
            }

            if (!TryDecode(hostText, allowNul: false, out var decodedHost, out error))
            {
                error = "host: " + error;
                return false;
            }

            host = decodedHost;
        }

        if (portText.Length > 0)
        {
            if (!portText.All(char.IsAsciiDigit) || !int.TryParse(portText, NumberStyles.None, CultureInfo.InvariantCulture, out port) || port is < 1 or > 65535)
            {
                error = $"port '{portText}' is not a number from 1 to 65535";
                return false;
            }
        }

        error = null;
        return true;
    }

    private static bool TryParseQuery(string? query, out Dictionary<string, string> parameters, out string? error)
    {
        parameters = new Dictionary<string, string>(StringComparer.Ordinal);
        error = null;
        if (string.IsNullOrEmpty(query))
        {
            return true;
        }

        foreach (var part in query.Split('&'))
        {
            if (part.Length == 0)
            {
                continue;
            }

            var equals = part.IndexOf('=', StringComparison.Ordinal);
            var keyText = equals < 0 ? part : part[..equals];
            var valueText = equals < 0 ? string.Empty : part[(equals + 1)..];
            if (!TryDecode(keyText, allowNul: false, out var key, out error))
            {
                error = $"query parameter name '{keyText}': {error}";
                return false;
            }

            // Only socket may carry a NUL: a leading one names an abstract socket (uri.md, "socket parameter").
            if (!TryDecode(valueText, allowNul: key == "socket", out var value, out error))
            {
                error = $"query parameter '{key}': {error}";
                return false;
            }

            if (key == "socket" && value.Length > 1 && value.IndexOf('\0', 1) >= 0)
            {
                error = "the socket path may contain NUL only as its first character (an abstract socket)";
                return false;
            }

            if (!parameters.TryAdd(key, value))
            {
                error = $"query parameter '{key}' is given more than once";
                return false;
            }
        }

        return true;
    }

    /// <summary>Percent-decodes RFC 3986 text into a UTF-8 string. '+' stays a plus sign (it is not form encoding).</summary>
    private static bool TryDecode(string text, bool allowNul, out string value, out string? error)
    {
        value = text;
        error = null;
        if (!text.Contains('%', StringComparison.Ordinal))
        {
            return true;
        }

        var bytes = new List<byte>(text.Length);
        Span<byte> utf8 = stackalloc byte[4];
        for (var i = 0; i < text.Length; i++)
        {
            var c = text[i];
            if (c == '%')
            {
                if (i + 2 >= text.Length || !byte.TryParse(text.AsSpan(i + 1, 2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var b))
                {
                    error = $"'%' at position {i} is not followed by two hex digits";
                    return false;
                }

                bytes.Add(b);
                i += 2;
                continue;
            }

            // Non-ASCII characters (an IRI pasted by hand) stand for their UTF-8 bytes; a lone surrogate stands for none.
            if (char.IsSurrogate(c) && !char.IsSurrogatePair(text, i))
            {
                error = $"the character at position {i} is half a UTF-16 surrogate pair";
                return false;
            }

            var rune = char.IsSurrogatePair(text, i) ? new Rune(text[i], text[++i]) : new Rune(c);
            var count = rune.EncodeToUtf8(utf8);
            for (var j = 0; j < count; j++)
            {
                bytes.Add(utf8[j]);
            }
        }

        try
        {
            value = StrictUtf8.GetString(bytes.ToArray());
        }
        catch (DecoderFallbackException)
        {
            error = "the percent-encoded bytes are not valid UTF-8";
            return false;
        }

        if (!allowNul && value.Contains('\0', StringComparison.Ordinal))
        {
            error = "contains NUL (%00), which NBD strings must not";
            return false;
        }

        return true;
    }

    private static string Escape(string value, bool keepSlash, bool userInfo = false)
    {
        var builder = new StringBuilder(value.Length);
        Span<byte> utf8 = stackalloc byte[4];
        foreach (var rune in value.EnumerateRunes())
        {
            if (rune.IsAscii && (char.IsAsciiLetterOrDigit((char)rune.Value) || "-._~!$'()*+,;:@".Contains((char)rune.Value, StringComparison.Ordinal) ||
                (keepSlash && rune.Value == '/')) && !(userInfo && rune.Value is '@' or ':'))
            {
                builder.Append((char)rune.Value);
                continue;
            }

            var count = rune.EncodeToUtf8(utf8);
            for (var i = 0; i < count; i++)
            {
                builder.Append('%').Append(utf8[i].ToString("X2", CultureInfo.InvariantCulture));
            }
        }

        return builder.ToString();
    }
}
