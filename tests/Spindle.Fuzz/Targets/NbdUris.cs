using System.Text;
using Spindle.Client;
using Spindle.Fuzz.Support;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// <see cref="NbdUri"/> parsing (the NBD URI specification, doc/uri.md), the input read as UTF-8. Invariant:
/// <see cref="NbdUri.TryParse"/> never throws and agrees with <see cref="NbdUri.Parse"/>, which throws only its
/// documented <see cref="FormatException"/>; a parsed URI prints (<see cref="NbdUri.ToString"/>) as a URI that parses
/// to an equal one, and printing that gives the same text.
/// </summary>
[Covers(typeof(NbdUri), nameof(NbdUri.Parse))]
[Covers(typeof(NbdUri), nameof(NbdUri.TryParse))]
public sealed class NbdUris : FuzzTarget
{
    public override void Run(byte[] input)
    {
        var text = Encoding.UTF8.GetString(input);
        var parsed = NbdUri.TryParse(text, out var uri, out var error);
        Check.That(parsed == (uri is not null) && parsed == (error is null), $"TryParse returned {parsed} with uri {uri is not null} and error '{error}'");
        try
        {
            var viaParse = NbdUri.Parse(text);
            Check.That(parsed && Same(uri!, viaParse), $"Parse accepted '{text}' that TryParse refused ({error}) or read differently");
        }
        catch (FormatException)
        {
            Check.That(!parsed, $"Parse refused '{text}' that TryParse accepted");
        }

        _ = NbdUri.LooksLikeUri(text);
        if (!parsed)
        {
            return;
        }

        _ = uri!.Target;
        var printed = uri.ToString();
        if (!NbdUri.TryParse(printed, out var again, out var problem))
        {
            throw new InvariantViolation($"'{text}' parsed, but its printed form '{printed}' does not: {problem}");
        }

        Check.That(Same(uri, again!), $"'{text}' printed as '{printed}', which parses to a different URI: {Describe(uri)} vs {Describe(again!)}");
        Check.That(again!.ToString() == printed, $"'{printed}' prints again as '{again}'");
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        yield return ("tcp", "nbd://example.com:10810/disk%201?tls-type=x509"u8.ToArray());
        yield return ("tls-ipv6", "nbds://user@[::1]/export?tls-hostname=h&tls-verify-peer=0&tls-certificates=/etc/pki"u8.ToArray());
        yield return ("unix", "nbd+unix:///name?socket=/run/nbd.sock&x-spindle-test=1"u8.ToArray());
        yield return ("abstract", "nbds+unix://?socket=%00abstract"u8.ToArray());
    }

    /// <summary>Field by field: the record's own equality compares the parameter dictionary by reference.</summary>
    private static bool Same(NbdUri a, NbdUri b) =>
        a.Scheme == b.Scheme && a.Transport == b.Transport && a.RequiresTls == b.RequiresTls && a.User == b.User && a.Host == b.Host
        && a.Port == b.Port && a.SocketPath == b.SocketPath && a.ExportName == b.ExportName && a.TlsType == b.TlsType
        && a.TlsHostname == b.TlsHostname && a.TlsVerifyPeer == b.TlsVerifyPeer && a.TlsCertificates == b.TlsCertificates
        && a.ExperimentalParameters.Count == b.ExperimentalParameters.Count
        && a.ExperimentalParameters.All(pair => b.ExperimentalParameters.TryGetValue(pair.Key, out var value) && value == pair.Value);

    private static string Describe(NbdUri uri) =>
        $"{uri with { ExperimentalParameters = uri.ExperimentalParameters }} [{string.Join(", ", uri.ExperimentalParameters.Select(p => $"{p.Key}={p.Value}"))}]";
}
