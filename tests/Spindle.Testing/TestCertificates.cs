using System.Security.Cryptography.X509Certificates;

namespace Spindle.Testing;

/// <summary>
/// Certificates made by the project's own scripts/make-certs.sh (openssl), as a user would make them: one CA with a
/// server certificate and the client certificates "client1" and "client2", and an unrelated CA with its own client
/// certificate, each in the nbdkit/qemu/libnbd directory layout.
/// </summary>
public sealed class TestCertificates : IDisposable
{
    private readonly TempDirectory _directory = new();

    private TestCertificates()
    {
    }

    /// <summary>ca-cert.pem, server-cert.pem/key, client-cert.pem/key (CN=client1).</summary>
    public string Directory => _directory.File("main");

    /// <summary>The same CA, client certificate CN=client2.</summary>
    public string SecondClientDirectory => _directory.File("client2");

    /// <summary>An unrelated CA and a client certificate it signed (CN=client1, so only the signature is wrong).</summary>
    public string WrongCaDirectory => _directory.File("wrong");

    /// <summary>Only the CA certificate: a client that checks the server but has no certificate of its own.</summary>
    public string CaOnlyDirectory => _directory.File("ca-only");

    public static async Task<TestCertificates> CreateAsync()
    {
        var certificates = new TestCertificates();
        var script = Path.Combine(RepositoryRoot(), "scripts", "make-certs.sh");
        await PeerTool.RunCheckedAsync("bash", [script, certificates.Directory, "localhost", "client1"]);

        Directory_CreateWithCa(certificates.Directory, certificates.SecondClientDirectory);
        await PeerTool.RunCheckedAsync("bash", [script, certificates.SecondClientDirectory, "localhost", "client2"]);

        await PeerTool.RunCheckedAsync("bash", [script, certificates.WrongCaDirectory, "localhost", "client1"]);

        System.IO.Directory.CreateDirectory(certificates.CaOnlyDirectory);
        File.Copy(Path.Combine(certificates.Directory, "ca-cert.pem"), Path.Combine(certificates.CaOnlyDirectory, "ca-cert.pem"));
        return certificates;
    }

    /// <summary>The CA of <see cref="Directory"/>, for a client that checks the server.</summary>
    public X509Certificate2 CaCertificate => X509CertificateLoader.LoadCertificateFromFile(Path.Combine(Directory, "ca-cert.pem"));

    /// <summary>The client1 certificate with its key.</summary>
    public X509Certificate2 ClientCertificate(string directory) =>
        X509CertificateLoader.LoadPkcs12(X509Certificate2.CreateFromPemFile(Path.Combine(directory, "client-cert.pem"), Path.Combine(directory, "client-key.pem")).Export(X509ContentType.Pkcs12), null);

    public void Dispose() => _directory.Dispose();

    /// <summary>The checkout's root (where Spindle.slnx is), found from the test binary's location.</summary>
    public static string RepositoryRoot()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "Spindle.slnx")))
            {
                return directory.FullName;
            }
        }

        throw new DirectoryNotFoundException("cannot find the repository root (Spindle.slnx) above " + AppContext.BaseDirectory);
    }

    private static void Directory_CreateWithCa(string from, string to)
    {
        System.IO.Directory.CreateDirectory(to);
        foreach (var name in new[] { "ca-cert.pem", "ca-key.pem" })
        {
            File.Copy(Path.Combine(from, name), Path.Combine(to, name));
        }
    }
}
