using Spindle.Server;
using Spindle.Server.Security;
using Spindle.Testing;
using Xunit;

namespace Spindle.Security.Tests;

/// <summary>Certificates made once per test class by scripts/make-certs.sh.</summary>
public sealed class CertificateFixture : IAsyncLifetime
{
    public TestCertificates Certificates { get; private set; } = null!;

    public async ValueTask InitializeAsync() => Certificates = await TestCertificates.CreateAsync();

    public ValueTask DisposeAsync()
    {
        Certificates.Dispose();
        return ValueTask.CompletedTask;
    }

    /// <summary>Server options with TLS from the main certificate directory.</summary>
    public Action<ServerOptions> Tls(TlsMode mode, bool requireClientCertificate = false) =>
        options => options.Tls = TlsOptions.FromDirectory(Certificates.Directory, mode, requireClientCertificate);
}
