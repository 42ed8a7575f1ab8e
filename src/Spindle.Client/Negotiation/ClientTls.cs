using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using Spindle.Wire;

namespace Spindle.Client.Negotiation;

/// <summary>
/// The client's TLS: what a URI and <see cref="NbdTlsOptions"/> ask for, resolved into certificates and a host name,
/// and the handshake that turns a socket transport into a <see cref="TlsTransport"/> after NBD_OPT_STARTTLS.
/// </summary>
internal sealed class ClientTls
{
    private ClientTls(string hostname, bool verifyPeer, X509Certificate2Collection? roots, X509Certificate2? clientCertificate, string trustDescription, SslProtocols protocols, TimeSpan handshakeTimeout)
    {
        HandshakeTimeout = handshakeTimeout;
        Hostname = hostname;
        VerifyPeer = verifyPeer;
        Roots = roots;
        ClientCertificate = clientCertificate;
        TrustDescription = trustDescription;
        Protocols = protocols;
    }

    public string Hostname { get; }

    public bool VerifyPeer { get; }

    public X509Certificate2Collection? Roots { get; }

    public X509Certificate2? ClientCertificate { get; }

    /// <summary>What the server's certificate is checked against, for messages ("/etc/certs/ca-cert.pem", "the system's trusted roots").</summary>
    public string TrustDescription { get; }

    public SslProtocols Protocols { get; }

    public TimeSpan HandshakeTimeout { get; }

    /// <summary>
    /// The TLS settings for <paramref name="uri"/>: its parameters first, then <paramref name="options"/>. Certificate
    /// files are read now, so a missing or unreadable one is reported before anything is sent.
    /// </summary>
    /// <exception cref="NbdTlsException">The settings cannot be used (no such directory, half a key pair, PSK...).</exception>
    public static ClientTls Resolve(NbdUri uri, NbdTlsOptions options)
    {
        if (uri.TlsType is "psk" or "anon")
        {
            throw new NbdTlsException($"tls-type={uri.TlsType} is not supported: .NET's TLS has no {(uri.TlsType == "psk" ? "pre-shared keys" : "anonymous key exchange")}; use X.509 certificates (tls-type=x509, the default)");
        }

        var hostname = uri.TlsHostname ?? options.Hostname ?? (uri.Transport == NbdTransportKind.Unix ? "localhost" : uri.Host!);
        var verify = uri.TlsVerifyPeer ?? options.VerifyPeer;
        var directory = uri.TlsCertificates ?? options.CertificateDirectory;
        var roots = options.TrustedRoots;
        var clientCertificate = options.ClientCertificate;
        var trust = roots is null ? "the system's trusted roots" : "the trusted roots given";
        if (directory is not null)
        {
            var full = Path.GetFullPath(directory);
            if (!Directory.Exists(full))
            {
                throw new NbdTlsException($"TLS certificate directory {full} does not exist (it should hold ca-cert.pem, and client-cert.pem with client-key.pem for a client certificate)");
            }

            var caPath = Path.Combine(full, "ca-cert.pem");
            if (File.Exists(caPath) && (uri.TlsCertificates is not null || roots is null))
            {
                roots = LoadRoots(caPath);
                trust = caPath;
            }

            var certificatePath = Path.Combine(full, "client-cert.pem");
            var keyPath = Path.Combine(full, "client-key.pem");
            if (File.Exists(certificatePath) != File.Exists(keyPath))
            {
                throw new NbdTlsException($"{full} has {(File.Exists(certificatePath) ? "client-cert.pem but no client-key.pem" : "client-key.pem but no client-cert.pem")}: a client certificate needs both");
            }

            if (File.Exists(certificatePath) && (uri.TlsCertificates is not null || clientCertificate is null))
            {
                clientCertificate = LoadClientCertificate(certificatePath, keyPath);
            }
        }

        return new ClientTls(hostname, verify, roots, clientCertificate, trust, options.Protocols, options.HandshakeTimeout);
    }

    /// <summary>
    /// The TLS handshake over <paramref name="plain"/>, which the caller owns until this returns: on success the
    /// returned transport owns it.
    /// </summary>
    /// <exception cref="NbdTlsException">The handshake failed or the server's certificate was rejected.</exception>
    public async Task<TlsTransport> HandshakeAsync(Transport plain, CancellationToken cancellationToken)
    {
        string? rejection = null;
        var options = new SslClientAuthenticationOptions
        {
            TargetHost = Hostname,
            EnabledSslProtocols = Protocols,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            ClientCertificates = ClientCertificate is null ? null : [ClientCertificate],
            RemoteCertificateValidationCallback = (_, certificate, chain, errors) =>
            {
                if (!VerifyPeer || errors == SslPolicyErrors.None)
                {
                    return true;
                }

                rejection = DescribeRejection(certificate, chain, errors);
                return false;
            },
        };
        if (Roots is not null)
        {
            var policy = new X509ChainPolicy
            {
                TrustMode = X509ChainTrustMode.CustomRootTrust,
                RevocationMode = X509RevocationMode.NoCheck,
            };
            policy.CustomTrustStore.AddRange(Roots);
            options.CertificateChainPolicy = policy;
        }

        try
        {
            return await TlsTransport.AuthenticateAsClientAsync(plain, options, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is AuthenticationException or IOException)
        {
            if (rejection is not null)
            {
                throw new NbdTlsException($"{plain.RemoteDescription}: the server's certificate was rejected: {rejection}", exception);
            }

            var hint = ClientCertificate is null ? " (if the server verifies clients, give a client certificate: DIR/client-cert.pem and DIR/client-key.pem)" : string.Empty;
            throw new NbdTlsException($"TLS handshake with {plain.RemoteDescription} failed: {exception.Message}{hint}", exception);
        }
    }

    private string DescribeRejection(X509Certificate? certificate, X509Chain? chain, SslPolicyErrors errors)
    {
        var subject = certificate?.Subject ?? "(none)";
        var reasons = new List<string>();
        if ((errors & SslPolicyErrors.RemoteCertificateNotAvailable) != 0)
        {
            reasons.Add("the server sent no certificate");
        }

        if ((errors & SslPolicyErrors.RemoteCertificateChainErrors) != 0)
        {
            var status = chain?.ChainStatus.Select(s => s.StatusInformation.Trim()).Where(s => s.Length > 0).Distinct().ToList() ?? [];
            reasons.Add($"'{subject}' is not signed by an authority in {TrustDescription}" + (status.Count > 0 ? $" ({string.Join("; ", status)})" : string.Empty));
        }

        if ((errors & SslPolicyErrors.RemoteCertificateNameMismatch) != 0)
        {
            var names = certificate is null ? [] : NamesOf(X509CertificateLoader.LoadCertificate(certificate.GetRawCertData()));
            reasons.Add($"'{subject}' is not for '{Hostname}'" + (names.Count > 0 ? $" (it names {string.Join(", ", names)})" : string.Empty) +
                "; connect by one of its names, or set tls-hostname=NAME");
        }

        return string.Join("; ", reasons) + " (tls-verify-peer=0 skips these checks)";
    }

    private static List<string> NamesOf(X509Certificate2 certificate)
    {
        var names = new List<string>();
        foreach (var extension in certificate.Extensions)
        {
            if (extension is X509SubjectAlternativeNameExtension san)
            {
                names.AddRange(san.EnumerateDnsNames());
                names.AddRange(san.EnumerateIPAddresses().Select(address => address.ToString()));
            }
        }

        return names;
    }

    private static X509Certificate2Collection LoadRoots(string path)
    {
        try
        {
            var roots = new X509Certificate2Collection();
            roots.ImportFromPemFile(path);
            if (roots.Count == 0)
            {
                throw new NbdTlsException($"{path} holds no certificate");
            }

            return roots;
        }
        catch (CryptographicException exception)
        {
            throw new NbdTlsException($"cannot read {path}: {exception.Message}", exception);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            throw new NbdTlsException($"cannot read {path}: {exception.Message}", exception);
        }
    }

    private static X509Certificate2 LoadClientCertificate(string certificatePath, string keyPath)
    {
        try
        {
            // Through PKCS#12 so that the key is usable for the handshake on every platform (an ephemeral PEM key is
            // not on Windows); on Linux this is a copy.
            using var pem = X509Certificate2.CreateFromPemFile(certificatePath, keyPath);
            return X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
        }
        catch (CryptographicException exception)
        {
            throw new NbdTlsException($"cannot load the client certificate {certificatePath} with {keyPath}: {exception.Message}", exception);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            throw new NbdTlsException($"cannot read {certificatePath} or {keyPath}: {exception.Message}", exception);
        }
    }

    public override string ToString()
    {
        var text = new StringBuilder($"TLS to '{Hostname}'");
        text.Append(VerifyPeer ? $", checked against {TrustDescription}" : ", server not verified");
        if (ClientCertificate is not null)
        {
            text.Append($", client certificate '{ClientCertificate.Subject}'");
        }

        return text.ToString();
    }
}
