using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Security.Tests;

/// <summary>A raw NBD client that can switch to TLS after NBD_OPT_STARTTLS, checking the server against the test CA.</summary>
internal static class TlsClient
{
    /// <summary>Connects, sends STARTTLS, runs the TLS handshake and returns a raw client speaking over TLS.</summary>
    public static async Task<RawNbdClient> ConnectAsync(TestServer server, TestCertificates certificates, string? clientDirectory = null, Func<RawNbdClient, Task>? beforeTls = null)
    {
        var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        await socket.ConnectAsync(server.EndPoint);
        var network = new NetworkStream(socket, ownsSocket: true);
        var plain = new RawNbdClient(network, socket);
        await plain.StartAsync();
        if (beforeTls is not null)
        {
            await beforeTls(plain);
        }

        await plain.SendOptionAsync(NbdOption.StartTls);
        var (header, _) = await plain.ReadOptionReplyAsync();
        Assert.Equal(OptionReplyType.Ack, header.Type);

        var ca = certificates.CaCertificate;
        var tls = new SslStream(network, leaveInnerStreamOpen: false, (_, certificate, _, _) => Trusts(ca, certificate));
        var options = new SslClientAuthenticationOptions { TargetHost = "localhost" };
        if (clientDirectory is not null)
        {
            options.ClientCertificates = [certificates.ClientCertificate(clientDirectory)];
        }

        await tls.AuthenticateAsClientAsync(options);
        return new RawNbdClient(tls, socket);
    }

    private static bool Trusts(X509Certificate2 ca, X509Certificate? certificate)
    {
        if (certificate is null)
        {
            return false;
        }

        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.Add(ca);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        return chain.Build(X509CertificateLoader.LoadCertificate(certificate.GetRawCertData()));
    }
}
