using System.ComponentModel;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Spindle.Protocol;
using Spindle.Server.Logging;
using Spindle.Server.Security;
using Spindle.Wire;

namespace Spindle.Server.Negotiation;

/// <summary>NBD_OPT_STARTTLS (proto.md "TLS support"; the reference sheet §7): TLS is a transport swap.</summary>
internal sealed partial class ServerNegotiator
{
    private bool _tlsActive;
    private ClientIdentity? _identity;

    /// <summary>The client's TLS identity, once it presented a certificate that was accepted.</summary>
    public ClientIdentity? Identity => _identity;

    /// <summary>True once a refusal of this client was counted (so the connection does not count it again).</summary>
    public bool RefusalCounted { get; private set; }

    /// <summary>Counts a refused client once, by reason (the <c>spindle.server.refusals</c> instrument).</summary>
    private void CountRefusal(string reason)
    {
        RefusalCounted = true;
        _server.CountRefusal(reason);
    }

    private static string RefusalReason(OptionReplyType refusal) => refusal switch
    {
        OptionReplyType.ErrorTlsRequired => "tls_required",
        OptionReplyType.ErrorPolicy => "access_denied",
        _ => "unknown_export",
    };

    /// <summary>True once STARTTLS succeeded: everything after it is encrypted.</summary>
    public bool TlsActive => _tlsActive;

    /// <summary>
    /// NBD_OPT_STARTTLS: acknowledge in plain text, then run the TLS handshake and swap the transport. Everything
    /// negotiated before is forgotten (structured replies, metadata contexts), so nothing injected in plain text
    /// survives into the encrypted session (CVE-2021-3716).
    /// </summary>
    private async Task<NegotiationOutcome?> HandleStartTlsAsync(OptionHeader header, CancellationToken cancellationToken)
    {
        await DiscardAsync(header, cancellationToken).ConfigureAwait(false);
        if (header.DataLength != 0)
        {
            WriteError(NbdOption.StartTls, OptionReplyType.ErrorInvalid, "NBD_OPT_STARTTLS takes no data");
            return null;
        }

        if (TlsMode == TlsMode.Off)
        {
            WriteError(NbdOption.StartTls, OptionReplyType.ErrorPolicy, _server.Options.Tls is null ? "TLS is not configured on this server" : "TLS needs fixed newstyle negotiation");
            return null;
        }

        if (_tlsActive)
        {
            WriteError(NbdOption.StartTls, OptionReplyType.ErrorInvalid, "TLS is already active");
            return null;
        }

        WriteReply(NbdOption.StartTls, OptionReplyType.Ack, default);
        await FlushAsync(cancellationToken).ConfigureAwait(false);

        var tls = _server.Options.Tls!;
        var options = new SslServerAuthenticationOptions
        {
            ServerCertificateContext = SslStreamCertificateContext.Create(tls.Certificate, tls.Chain),
            ClientCertificateRequired = tls.ClientCertificateAuthorities is not null,
            EnabledSslProtocols = tls.Protocols,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            RemoteCertificateValidationCallback = (_, certificate, _, _) => ValidateClient(tls, certificate),
        };

        TlsTransport secure;
        try
        {
            // Bytes the client sent right behind its option (its ClientHello) belong to the handshake.
            secure = await TlsTransport.AuthenticateAsServerAsync(_transport, _input.TakeAll(), options, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is AuthenticationException or IOException or Win32Exception && !cancellationToken.IsCancellationRequested)
        {
            // (A handshake cut by the negotiation deadline or a stop is reported as such by the caller instead.)
            ServerLog.TlsFailed(_logger, Id, Peer, exception.Message);
            CountRefusal("tls_failed");
            return NegotiationOutcome.Refused;
        }

        _identity = secure.RemoteCertificate is { } remote ? ClientIdentity.FromCertificate(X509CertificateLoader.LoadCertificate(remote.GetRawCertData())) : null;
        _transport = secure;
        _input.ReplaceTransport(secure);
        _tlsActive = true;
        _structuredReplies = false;
        ExtendedHeaders = false;
        _selected.Clear();
        _contextExport = null;
        ServerLog.TlsStarted(_logger, Id, Peer, secure.Protocol.ToString(), _identity?.ToString() ?? "no client certificate");
        return null;
    }

    private bool ValidateClient(TlsOptions tls, X509Certificate? certificate)
    {
        if (certificate is null)
        {
            return !tls.RequireClientCertificate;
        }

        if (tls.ClientCertificateAuthorities is null)
        {
            return !tls.RequireClientCertificate;
        }

        using var leaf = X509CertificateLoader.LoadCertificate(certificate.GetRawCertData());
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(tls.ClientCertificateAuthorities);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;

        // A certificate that lists extended key usages must list client authentication.
        chain.ChainPolicy.ApplicationPolicy.Add(new Oid("1.3.6.1.5.5.7.3.2"));
        if (chain.Build(leaf))
        {
            return true;
        }

        ServerLog.ClientCertificateRejected(_logger, Id, Peer, leaf.Subject, string.Join("; ", chain.ChainStatus.Select(s => s.StatusInformation.Trim())));
        return false;
    }
}
