using Spindle.Server.Exports;
using Spindle.Server.Security;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>Certificates made once for the TLS tests by scripts/make-certs.sh.</summary>
public sealed class ClientCertificateFixture : IAsyncLifetime
{
    public TestCertificates Certificates { get; private set; } = null!;

    public async ValueTask InitializeAsync() => Certificates = await TestCertificates.CreateAsync();

    public ValueTask DisposeAsync()
    {
        Certificates.Dispose();
        return ValueTask.CompletedTask;
    }
}

/// <summary>
/// The client's TLS (nbds://, nbds+unix://) against nbdkit --tls=require (with and without --tls-verify-peer) and
/// against Spindle's own server (a TLS-only export, FORCEDTLS, client certificates): what works, and a clear error for
/// every refusal, never a silent fall back to plain text.
/// </summary>
public sealed class TlsClientTests(ClientCertificateFixture fixture) : IClassFixture<ClientCertificateFixture>
{
    private const int Size = 4 << 20;

    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);

    private TestCertificates Certificates => fixture.Certificates;

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    private static string Tls(string uri, string directory, string extra = "") =>
        uri.Replace("nbd://", "nbds://", StringComparison.Ordinal).Replace("nbd+unix://", "nbds+unix://", StringComparison.Ordinal) +
        (uri.Contains('?', StringComparison.Ordinal) ? "&" : "?") + "tls-certificates=" + directory + extra;

    // ---- nbdkit ----

    [Fact]
    public async Task Nbdkit_tls_require_serves_an_nbds_client_and_turns_away_a_plain_one()
    {
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["--tls=require", $"--tls-certificates={Certificates.Directory}", "memory", "4M"]);
        await using (var client = await NbdClient.ConnectAsync(Tls(nbdkit.Uri(), Certificates.CaOnlyDirectory), cancellationToken: Token))
        {
            Assert.True(client.Export.Tls);
            var data = Patterns.Generate(8192, 256 * 1024, seed: 5);
            await client.WriteAsync(8192, data, Token);
            await client.FlushAsync(Token);
            var back = new byte[data.Length];
            await client.ReadAsync(8192, back, Token);
            Assert.Equal(data, back);
        }

        var plain = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync(nbdkit.Uri(), cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("requires TLS", plain.Message, StringComparison.Ordinal);
        Assert.Contains("use an nbds:// URI", plain.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Nbdkit_tls_verify_peer_accepts_the_client_certificate_and_refuses_a_client_without_one()
    {
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["--tls=require", $"--tls-certificates={Certificates.Directory}", "--tls-verify-peer", "memory", "4M"]);
        await using (var client = await NbdClient.ConnectAsync(Tls(nbdkit.Uri(), Certificates.Directory), cancellationToken: Token))
        {
            Assert.True(client.Export.Tls);
            await client.WriteAsync(0, new byte[4096], Token);
        }

        // The same CA, but no client certificate of its own: nbdkit ends the session, and the error says why it may have.
        var refused = await Assert.ThrowsAnyAsync<NbdException>(() => NbdClient.ConnectAsync(Tls(nbdkit.Uri(), Certificates.CaOnlyDirectory), cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("client certificate", refused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_server_certificate_from_another_ca_or_for_another_name_is_rejected_unless_verification_is_off()
    {
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["--tls=require", $"--tls-certificates={Certificates.Directory}", "memory", "1M"]);

        var wrongCa = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync(Tls(nbdkit.Uri(), Certificates.WrongCaDirectory), cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("the server's certificate was rejected", wrongCa.Message, StringComparison.Ordinal);
        Assert.Contains($"is not signed by an authority in {Path.Combine(Certificates.WrongCaDirectory, "ca-cert.pem")}", wrongCa.Message, StringComparison.Ordinal);

        var wrongName = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync(Tls(nbdkit.Uri(), Certificates.Directory, "&tls-hostname=disks.example.org"), cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("is not for 'disks.example.org'", wrongName.Message, StringComparison.Ordinal);
        Assert.Contains("localhost", wrongName.Message, StringComparison.Ordinal);

        // Connecting by a name the certificate carries works (the URI names 127.0.0.1, which it also carries).
        await using (await NbdClient.ConnectAsync(Tls(nbdkit.Uri(), Certificates.Directory, "&tls-hostname=localhost"), cancellationToken: Token))
        {
        }

        await using var unchecked_ = await NbdClient.ConnectAsync(Tls(nbdkit.Uri(), Certificates.WrongCaDirectory, "&tls-verify-peer=0"), cancellationToken: Token);
        Assert.True(unchecked_.Export.Tls);
    }

    [Fact]
    public async Task Spindle_info_and_dump_speak_tls_to_nbdkit()
    {
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["--tls=require", $"--tls-certificates={Certificates.Directory}", "pattern", "1M"]);
        var uri = Tls(nbdkit.Uri(), Certificates.Directory);
        var info = await SpindleCli.RunAsync("info", uri);
        Assert.True(info.ExitCode == 0, info.ToString());
        Assert.Contains("protocol: newstyle-fixed with TLS", info.StandardOutput, StringComparison.Ordinal);

        var dump = await SpindleCli.RunAsync("dump", "-n", "32", uri);
        Assert.True(dump.ExitCode == 0, dump.ToString());

        // nbdkit's pattern plugin: each 8-byte big-endian word holds its own offset.
        Assert.StartsWith("00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 08", dump.StandardOutput, StringComparison.Ordinal);
    }

    // ---- Spindle's server ----

    private Task<TestServer> StartSpindleAsync(TlsMode mode, bool requireClientCertificate = false) =>
        TestServer.StartAsync(
            catalog =>
            {
                catalog.Add(new Export(new ExportOptions { Name = "open" }, new MemoryBlockDevice(1 << 20)));
                catalog.Add(new Export(new ExportOptions { Name = "secret", Tls = TlsMode.Require }, new MemoryBlockDevice(2 << 20)));
            },
            options => options.Tls = TlsOptions.FromDirectory(Certificates.Directory, mode, requireClientCertificate));

    [Fact]
    public async Task A_tls_only_export_is_served_over_tls_and_refused_in_plain_text()
    {
        await using var server = await StartSpindleAsync(TlsMode.On);
        foreach (var uri in new[] { Tls(server.Uri("secret"), Certificates.CaOnlyDirectory), Tls(server.UnixUri("secret"), Certificates.CaOnlyDirectory) })
        {
            await using var client = await NbdClient.ConnectAsync(uri, cancellationToken: Token);
            Assert.True(client.Export.Tls);
            Assert.Equal(2 << 20, client.Size);
            var data = Patterns.Generate(0, 65536, seed: 9);
            await client.WriteAsync(65536, data, Token);
            var back = new byte[data.Length];
            await client.ReadAsync(65536, back, Token);
            Assert.Equal(data, back);
        }

        var plain = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync(server.Uri("secret"), cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("serves export 'secret' only over TLS, or has no such export", plain.Message, StringComparison.Ordinal);

        // Listing over TLS shows the TLS-only export too.
        var listed = await NbdClient.ListExportsAsync(NbdUri.Parse(Tls(server.Uri(), Certificates.CaOnlyDirectory)), cancellationToken: Token);
        Assert.Equal(["open", "secret"], listed.Select(export => export.Name).Order(StringComparer.Ordinal));
    }

    [Fact]
    public async Task Forced_tls_refuses_plain_clients_before_any_option()
    {
        await using var server = await StartSpindleAsync(TlsMode.Require);
        await using (var client = await NbdClient.ConnectAsync(Tls(server.Uri("open"), Certificates.CaOnlyDirectory), cancellationToken: Token))
        {
            Assert.True(client.Export.Tls);
        }

        var plain = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync(server.Uri("open"), cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("requires TLS (NBD_OPT_EXTENDED_HEADERS answered NBD_REP_ERR_TLS_REQD", plain.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Client_certificates_are_required_and_one_from_another_ca_is_refused()
    {
        await using var server = await StartSpindleAsync(TlsMode.Require, requireClientCertificate: true);
        await using (var client = await NbdClient.ConnectAsync(Tls(server.Uri("open"), Certificates.Directory), cancellationToken: Token))
        {
            await client.WriteAsync(0, new byte[512], Token);
        }

        await Assert.ThrowsAnyAsync<NbdException>(() => NbdClient.ConnectAsync(Tls(server.Uri("open"), Certificates.CaOnlyDirectory), cancellationToken: Token).WaitAsync(Bound, Token));

        // Trusts the right CA, but presents client1 signed by the other one.
        var options = new NbdClientOptions();
        options.Tls.TrustedRoots = [Certificates.CaCertificate];
        options.Tls.ClientCertificate = Certificates.ClientCertificate(Certificates.WrongCaDirectory);
        var uri = server.Uri("open").Replace("nbd://", "nbds://", StringComparison.Ordinal);
        var wrong = await Assert.ThrowsAnyAsync<NbdException>(() => NbdClient.ConnectAsync(uri, options, Token).WaitAsync(Bound, Token));
        Assert.True(wrong is NbdTlsException or NbdConnectionException, wrong.ToString());
    }

    [Fact]
    public async Task Unusable_tls_settings_are_reported_before_connecting()
    {
        await using var server = await StartSpindleAsync(TlsMode.On);
        using var directory = new TempDirectory();
        File.Copy(Path.Combine(Certificates.Directory, "client-cert.pem"), directory.File("client-cert.pem"));
        var half = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync(Tls(server.Uri("open"), directory.Path), cancellationToken: Token));
        Assert.Contains("client-cert.pem but no client-key.pem", half.Message, StringComparison.Ordinal);

        var psk = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync(server.Uri("open").Replace("nbd://", "nbds://", StringComparison.Ordinal) + "?tls-type=psk", cancellationToken: Token));
        Assert.Contains("tls-type=psk is not supported", psk.Message, StringComparison.Ordinal);
    }
}
