using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;

namespace Spindle.Client;

/// <summary>
/// How the client does TLS for <c>nbds://</c> and <c>nbds+unix://</c> URIs. A URI's own parameters
/// (<c>tls-certificates</c>, <c>tls-hostname</c>, <c>tls-verify-peer</c>) take precedence over these.
/// </summary>
/// <remarks>
/// A plain <c>nbd://</c> URI never uses TLS, as with libnbd: opportunistic TLS that falls back to plain text protects
/// against nobody who can tamper with the connection, and a server that requires TLS says so (NBD_REP_ERR_TLS_REQD),
/// which the client reports as "use nbds://".
/// </remarks>
public sealed class NbdTlsOptions
{
    /// <summary>
    /// A directory in the layout libnbd, qemu and nbdkit use: <c>ca-cert.pem</c> (the authority the server's
    /// certificate must chain to; without it the system's trusted roots are used) and, optionally,
    /// <c>client-cert.pem</c> with <c>client-key.pem</c> (the client's own certificate, for servers that verify
    /// clients). Default: none (system roots, no client certificate).
    /// </summary>
    public string? CertificateDirectory { get; set; }

    /// <summary>Trusted roots for the server's certificate, instead of <c>ca-cert.pem</c>. Default: none.</summary>
    public X509Certificate2Collection? TrustedRoots { get; set; }

    /// <summary>The client's certificate with its private key, instead of <c>client-cert.pem</c>. Default: none.</summary>
    public X509Certificate2? ClientCertificate { get; set; }

    /// <summary>
    /// Check the server's certificate (its chain and its name). Default: true; false (the URI's
    /// <c>tls-verify-peer=0</c>) encrypts without knowing who is at the other end.
    /// </summary>
    public bool VerifyPeer { get; set; } = true;

    /// <summary>
    /// The name the server's certificate must carry. Default: the URI's host (an IP address is matched against the
    /// certificate's IP addresses), or <c>localhost</c> for a Unix socket.
    /// </summary>
    public string? Hostname { get; set; }

    /// <summary>TLS versions offered. Default: 1.2 and 1.3, as the NBD spec asks (nothing older).</summary>
    public SslProtocols Protocols { get; set; } = SslProtocols.Tls12 | SslProtocols.Tls13;

    /// <summary>How long the TLS handshake may take (within the NBD handshake timeout). Default: 30 seconds.</summary>
    public TimeSpan HandshakeTimeout { get; set; } = TimeSpan.FromSeconds(30);
}
