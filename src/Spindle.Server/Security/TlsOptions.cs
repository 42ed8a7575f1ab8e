using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;

namespace Spindle.Server.Security;

/// <summary>How a server, or one export, treats TLS (proto.md "TLS support").</summary>
public enum TlsMode
{
    /// <summary>NOTLS: STARTTLS is refused with ERR_POLICY.</summary>
    Off,

    /// <summary>TLS is offered; exports that do not require it may be used in plain text too.</summary>
    On,

    /// <summary>
    /// For the server: FORCEDTLS (every option but STARTTLS and ABORT gets ERR_TLS_REQD until TLS is up). For an
    /// export: a TLS-only export, invisible to clients that have not started TLS.
    /// </summary>
    Require,
}

/// <summary>The server's TLS settings: its certificate, and how clients are authenticated.</summary>
public sealed class TlsOptions
{
    /// <summary>The server's certificate with its private key.</summary>
    public required X509Certificate2 Certificate { get; init; }

    /// <summary>Intermediate certificates sent along with <see cref="Certificate"/>.</summary>
    public X509Certificate2Collection Chain { get; init; } = [];

    /// <summary>Trusted roots for client certificates (ca-cert.pem); null accepts no client certificate.</summary>
    public X509Certificate2Collection? ClientCertificateAuthorities { get; init; }

    /// <summary>Require every client to present a certificate signed by <see cref="ClientCertificateAuthorities"/>. Default: false.</summary>
    public bool RequireClientCertificate { get; init; }

    /// <summary>Server-wide mode. Default: <see cref="TlsMode.On"/> once a certificate is configured.</summary>
    public TlsMode Mode { get; init; } = TlsMode.On;

    /// <summary>TLS 1.2 and 1.3 only (the spec's floor is 1.2; older versions are refused).</summary>
    public SslProtocols Protocols { get; init; } = SslProtocols.Tls12 | SslProtocols.Tls13;

    /// <summary>The TLS handshake must finish within this time. Default: 10 seconds.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// Loads the layout nbdkit, qemu and libnbd users already have: a directory with <c>server-cert.pem</c>,
    /// <c>server-key.pem</c> and, for client certificates, <c>ca-cert.pem</c>.
    /// </summary>
    public static TlsOptions FromDirectory(string directory, TlsMode mode = TlsMode.On, bool requireClientCertificate = false)
    {
        var full = Path.GetFullPath(directory);
        var certificatePath = Path.Combine(full, "server-cert.pem");
        var keyPath = Path.Combine(full, "server-key.pem");
        var caPath = Path.Combine(full, "ca-cert.pem");
        if (!File.Exists(certificatePath) || !File.Exists(keyPath))
        {
            throw new FileNotFoundException($"{full} must contain server-cert.pem and server-key.pem (and ca-cert.pem to verify client certificates)");
        }

        var (certificate, chain) = LoadCertificate(certificatePath, keyPath);
        X509Certificate2Collection? authorities = null;
        if (File.Exists(caPath))
        {
            authorities = [];
            authorities.ImportFromPemFile(caPath);
        }
        else if (requireClientCertificate)
        {
            throw new FileNotFoundException($"client certificates are required but {caPath} does not exist");
        }

        return new TlsOptions
        {
            Certificate = certificate,
            Chain = chain,
            ClientCertificateAuthorities = authorities,
            RequireClientCertificate = requireClientCertificate,
            Mode = mode,
        };
    }

    /// <summary>Loads a PEM certificate (leaf first, then any intermediates) and its PEM private key.</summary>
    public static (X509Certificate2 Certificate, X509Certificate2Collection Chain) LoadCertificate(string certificatePath, string keyPath)
    {
        var all = new X509Certificate2Collection();
        all.ImportFromPemFile(certificatePath);
        if (all.Count == 0)
        {
            throw new InvalidDataException($"{certificatePath} holds no certificate");
        }

        using var withKey = X509Certificate2.CreateFromPemFile(certificatePath, keyPath);

        // An ephemeral PEM key cannot be used by SslStream on every platform; a PKCS#12 round trip makes it persistent.
        var certificate = X509CertificateLoader.LoadPkcs12(withKey.Export(X509ContentType.Pkcs12), null);
        var chain = new X509Certificate2Collection();
        for (var i = 1; i < all.Count; i++)
        {
            chain.Add(all[i]);
        }

        return (certificate, chain);
    }
}
