using System.Buffers;
using System.Buffers.Binary;
using System.ComponentModel;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using Spindle.Protocol;
using Spindle.Server.Buffers;
using Spindle.Server.Exports;
using Spindle.Server.Logging;
using Spindle.Server.Security;
using Spindle.Server.Transport;

namespace Spindle.Server.Connections;

internal enum NegotiationOutcome
{
    Transmission,
    Aborted,
    PeerClosed,
    Refused,
    TimedOut,
    Shutdown,
}

/// <summary>Fixed newstyle negotiation (proto.md "Handshake"; the reference sheet §2 and §10).</summary>
internal sealed partial class NbdConnection
{
    /// <summary>The id of <c>base:allocation</c> on every connection. Opaque to clients, valid only on this connection.</summary>
    internal const uint AllocationContextId = 1;

    private const ClientFlags KnownClientFlags = ClientFlags.FixedNewstyle | ClientFlags.NoZeroes;

    private readonly ArrayBufferWriter<byte> _output = new(1024);
    private bool _clientNoZeroes;
    private bool _structuredReplies;
    private string? _metaContextExport;
    private bool _allocationSelected;
    private int _optionCount;
    private Export? _export;
    private string _requestedName = string.Empty;
    private readonly List<(Export Export, DirectoryExportProvider Directory)> _dynamic = [];
    private bool _fixedNewstyle;
    private bool _tlsActive;
    private ClientIdentity? _identity;

    private async Task<NegotiationOutcome> NegotiateWithTimeoutAsync()
    {
        using var timeout = new CancellationTokenSource(_options.HandshakeTimeout);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(timeout.Token, _abort.Token, _server.StoppingToken);

        // A blocking receive does not see tokens: at the deadline (or when the server stops) the connection is cut,
        // which fails the receive. Nothing is in flight during negotiation, so cutting it loses nothing.
        using var cut = _transport.IsBlocking ? linked.Token.UnsafeRegister(static state => ((ConnectionTransport)state!).Abort(), _transport) : default;
        try
        {
            return await NegotiateAsync(linked.Token).ConfigureAwait(false);
        }
        catch (Exception exception) when (timeout.IsCancellationRequested && IsDisconnect(exception))
        {
            ServerLog.HandshakeTimedOut(_logger, Id, Peer, _options.HandshakeTimeout.TotalSeconds);
            return NegotiationOutcome.TimedOut;
        }
        catch (Exception exception) when (_server.StoppingToken.IsCancellationRequested && IsDisconnect(exception))
        {
            return NegotiationOutcome.Shutdown;
        }
    }

    private async Task<NegotiationOutcome> NegotiateAsync(CancellationToken cancellationToken)
    {
        ServerGreeting.Write(_output.GetSpan(ServerGreeting.Length), HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes);
        _output.Advance(ServerGreeting.Length);
        await FlushOutputAsync(cancellationToken).ConfigureAwait(false);

        if (!await _input.EnsureAsync(4, cancellationToken).ConfigureAwait(false))
        {
            return NegotiationOutcome.PeerClosed;
        }

        var clientFlags = (ClientFlags)BinaryPrimitives.ReadUInt32BigEndian(_input.Span);
        _input.Consume(4);
        if ((clientFlags & ~KnownClientFlags) != 0)
        {
            // "the server MUST drop the TCP connection if the client sets an unknown flag"
            ServerLog.ProtocolViolation(_logger, Id, Peer, $"unknown client flags 0x{(uint)clientFlags:x8}");
            return NegotiationOutcome.Refused;
        }

        _clientNoZeroes = (clientFlags & ClientFlags.NoZeroes) != 0;

        // TLS needs fixed newstyle on both sides; a client without it is served in NOTLS mode.
        _fixedNewstyle = (clientFlags & ClientFlags.FixedNewstyle) != 0;

        while (true)
        {
            if (!await _input.EnsureAsync(OptionHeader.Length, cancellationToken).ConfigureAwait(false))
            {
                return NegotiationOutcome.PeerClosed;
            }

            if (OptionHeader.TryRead(_input.Span, out var header) != ParseStatus.Done)
            {
                ServerLog.ProtocolViolation(_logger, Id, Peer, "option does not start with IHAVEOPT");
                return NegotiationOutcome.Refused;
            }

            _input.Consume(OptionHeader.Length);
            ServerLog.OptionReceived(_logger, Id, Peer, Describe(header.Option), header.DataLength);
            if (++_optionCount > _options.MaxOptionsPerConnection)
            {
                ServerLog.ProtocolViolation(_logger, Id, Peer, $"more than {_options.MaxOptionsPerConnection} options");
                return NegotiationOutcome.Refused;
            }

            var outcome = await HandleOptionAsync(header, cancellationToken).ConfigureAwait(false);
            await FlushOutputAsync(cancellationToken).ConfigureAwait(false);
            if (outcome is { } done)
            {
                if (done == NegotiationOutcome.Aborted)
                {
                    await _transport.ShutdownSendAsync().ConfigureAwait(false);
                }

                return done;
            }
        }
    }

    /// <summary>Handles one option. Returns null to keep negotiating.</summary>
    private async Task<NegotiationOutcome?> HandleOptionAsync(OptionHeader header, CancellationToken cancellationToken)
    {
        var option = header.Option;
        if (option == NbdOption.ExportName)
        {
            return await HandleExportNameAsync(header.DataLength, cancellationToken).ConfigureAwait(false);
        }

        if (option == NbdOption.Abort)
        {
            // Any data is ignored; the ACK is sent even while shutting down.
            await _input.DiscardAsync(header.DataLength, cancellationToken).ConfigureAwait(false);
            WriteReply(option, OptionReplyType.Ack, default);
            ServerLog.SoftDisconnect(_logger, Id, Peer, "NBD_OPT_ABORT");
            return NegotiationOutcome.Aborted;
        }

        if (_server.IsStopping)
        {
            await _input.DiscardAsync(header.DataLength, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorShutdown, "the server is shutting down");
            return null;
        }

        if (option == NbdOption.StartTls)
        {
            return await HandleStartTlsAsync(header.DataLength, cancellationToken).ConfigureAwait(false);
        }

        if (TlsMode == TlsMode.Require && !_tlsActive)
        {
            // FORCEDTLS: until TLS is up, everything but STARTTLS and ABORT is refused, unknown options included.
            await _input.DiscardAsync(header.DataLength, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorTlsRequired, "this server requires TLS: send NBD_OPT_STARTTLS first");
            return null;
        }

        if (!IsKnownOption(option))
        {
            // Unknown (or unimplemented) option: skip exactly its data so the next option parses, and say so.
            await _input.DiscardAsync(header.DataLength, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorUnsupported, $"{Describe(option)} is not supported by this server");
            return null;
        }

        if (header.DataLength > (uint)_options.MaxOptionDataLength)
        {
            await _input.DiscardAsync(header.DataLength, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorTooBig, $"{header.DataLength} bytes of option data is more than the {_options.MaxOptionDataLength} this server accepts");
            return null;
        }

        var length = (int)header.DataLength;
        var rented = BufferPool.Shared.Rent(Math.Max(length, 1));
        try
        {
            await _input.ReadExactlyAsync(rented.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
            return HandleBufferedOption(option, rented.AsSpan(0, length));
        }
        finally
        {
            BufferPool.Shared.Return(rented);
        }
    }

    private static bool IsKnownOption(NbdOption option) => option is NbdOption.List or NbdOption.Info
        or NbdOption.Go or NbdOption.StructuredReply or NbdOption.ListMetaContext or NbdOption.SetMetaContext;

    private NegotiationOutcome? HandleBufferedOption(NbdOption option, ReadOnlySpan<byte> data)
    {
        switch (option)
        {
            case NbdOption.List:
                HandleList(data);
                return null;
            case NbdOption.Info:
            case NbdOption.Go:
                return HandleInfoOrGo(option, data);
            case NbdOption.StructuredReply:
                HandleStructuredReply(data);
                return null;
            case NbdOption.ListMetaContext:
            case NbdOption.SetMetaContext:
                HandleMetaContext(option, data);
                return null;
            default:
                WriteError(option, OptionReplyType.ErrorUnsupported, $"{Describe(option)} is not supported by this server");
                return null;
        }
    }

    private async Task<NegotiationOutcome?> HandleExportNameAsync(uint length, CancellationToken cancellationToken)
    {
        // EXPORT_NAME has no error reply: when it cannot be satisfied the only answer is to close.
        if (length > NbdLimits.MaxStringLength)
        {
            ServerLog.ProtocolViolation(_logger, Id, Peer, $"NBD_OPT_EXPORT_NAME with a {length}-byte name");
            return NegotiationOutcome.Refused;
        }

        var bytes = new byte[length];
        await _input.ReadExactlyAsync(bytes, cancellationToken).ConfigureAwait(false);
        if (!NbdString.TryDecode(bytes, out var name, out var problem))
        {
            ServerLog.ProtocolViolation(_logger, Id, Peer, "NBD_OPT_EXPORT_NAME: " + problem);
            return NegotiationOutcome.Refused;
        }

        if (_server.IsStopping)
        {
            return NegotiationOutcome.Shutdown;
        }

        if (TlsMode == TlsMode.Require && !_tlsActive)
        {
            ServerLog.OptionRefused(_logger, Id, Peer, "NBD_OPT_EXPORT_NAME", OptionReplyType.ErrorTlsRequired, "TLS is required; closing, as EXPORT_NAME cannot report errors");
            return NegotiationOutcome.Refused;
        }

        var (export, refusal, reason) = Resolve(name);
        if (export is null || !export.TryConnect())
        {
            ReleaseIfDynamic(export);
            reason = export is null ? reason : $"export '{export.Name}' already has its {export.Options.MaxConnections} connections";
            ServerLog.OptionRefused(_logger, Id, Peer, "NBD_OPT_EXPORT_NAME", export is null ? refusal : OptionReplyType.ErrorPolicy, reason + "; closing, as EXPORT_NAME cannot report errors");
            return NegotiationOutcome.Refused;
        }

        var flags = export.FlagsFor(_structuredReplies);
        var span = _output.GetSpan(ExportNameReply.FullLength);
        _output.Advance(ExportNameReply.Write(span, (ulong)export.Size, flags, _clientNoZeroes));
        EnterTransmission(export, name);
        return NegotiationOutcome.Transmission;
    }

    private void HandleList(ReadOnlySpan<byte> data)
    {
        if (!data.IsEmpty)
        {
            WriteError(NbdOption.List, OptionReplyType.ErrorInvalid, "NBD_OPT_LIST takes no data");
            return;
        }

        if (!_options.AllowList)
        {
            WriteError(NbdOption.List, OptionReplyType.ErrorPolicy, "listing exports is disabled on this server");
            return;
        }

        // TLS-only exports before TLS, and exports this client may not use, are not listed.
        foreach (var export in _server.Catalog.Exports)
        {
            if (IsVisible(export.Options) && IsAllowed(export.Options, out _))
            {
                WriteReply(NbdOption.List, OptionReplyType.Server, ServerReply.Create(export.Name, export.Options.Description));
                if (_server.Catalog.ListAliases)
                {
                    foreach (var alias in export.Aliases)
                    {
                        WriteReply(NbdOption.List, OptionReplyType.Server, ServerReply.Create(alias, $"= {export.Name}"));
                    }
                }
            }
        }

        foreach (var directory in _server.Catalog.Directories)
        {
            var template = directory.Options.Template;
            if (IsVisible(template) && IsAllowed(template, out _))
            {
                foreach (var name in directory.List(SessionName))
                {
                    WriteReply(NbdOption.List, OptionReplyType.Server, ServerReply.Create(name, template.Description));
                }
            }
        }

        WriteReply(NbdOption.List, OptionReplyType.Ack, default);
    }

    private void HandleStructuredReply(ReadOnlySpan<byte> data)
    {
        if (!data.IsEmpty)
        {
            WriteError(NbdOption.StructuredReply, OptionReplyType.ErrorInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
            return;
        }

        if (_structuredReplies)
        {
            WriteError(NbdOption.StructuredReply, OptionReplyType.ErrorInvalid, "structured replies are already negotiated");
            return;
        }

        _structuredReplies = true;
        WriteReply(NbdOption.StructuredReply, OptionReplyType.Ack, default);
    }

    private NegotiationOutcome? HandleInfoOrGo(NbdOption option, ReadOnlySpan<byte> data)
    {
        if (!InfoRequest.TryParse(data, out var request, out var problem))
        {
            WriteError(option, OptionReplyType.ErrorInvalid, problem!);
            return null;
        }

        var (export, refusal, reason) = Resolve(request!.ExportName);
        if (export is null)
        {
            WriteError(option, refusal, reason);
            return null;
        }

        if (option == NbdOption.Go && !export.TryConnect())
        {
            ReleaseIfDynamic(export);
            WriteError(option, OptionReplyType.ErrorPolicy, $"export '{export.Name}' already has its {export.Options.MaxConnections} connections");
            return null;
        }

        Span<byte> info = stackalloc byte[InfoReplies.BlockSizeLength];
        var flags = export.FlagsFor(_structuredReplies);
        WriteReply(option, OptionReplyType.Info, info[..InfoReplies.WriteExport(info, (ulong)export.Size, flags)]);
        foreach (var requested in request.Requests.Distinct())
        {
            switch (requested)
            {
                case InfoType.Name:
                    WriteReply(option, OptionReplyType.Info, InfoReplies.StringInfo(InfoType.Name, export.Name));
                    break;
                case InfoType.Description when export.Options.Description is { Length: > 0 } description:
                    WriteReply(option, OptionReplyType.Info, InfoReplies.StringInfo(InfoType.Description, description));
                    break;
            }
        }

        // Block sizes go out whether asked for or not: a client that did not ask may ignore them, and one that did
        // learns what it must obey.
        WriteReply(option, OptionReplyType.Info, info[..InfoReplies.WriteBlockSize(info, export.BlockSizes)]);
        WriteReply(option, OptionReplyType.Ack, default);
        if (option == NbdOption.Go)
        {
            EnterTransmission(export, request.ExportName);
            return NegotiationOutcome.Transmission;
        }

        // INFO only looked: an image opened from a directory for it is given back.
        ReleaseIfDynamic(export);
        return null;
    }

    private void HandleMetaContext(NbdOption option, ReadOnlySpan<byte> data)
    {
        var set = option == NbdOption.SetMetaContext;
        if (set)
        {
            // SET replaces every earlier selection, even when it fails.
            _allocationSelected = false;
            _metaContextExport = null;
        }

        if (!_structuredReplies)
        {
            WriteError(option, OptionReplyType.ErrorInvalid, "metadata contexts need structured replies to be negotiated first");
            return;
        }

        if (!MetaContextRequest.TryParse(data, out var request, out var problem))
        {
            WriteError(option, OptionReplyType.ErrorInvalid, problem!);
            return;
        }

        // ERR_TLS_REQD is only allowed for INFO and GO: a hidden export is simply unknown here.
        var (export, refusal, reason) = Resolve(request!.ExportName);
        if (export is null)
        {
            WriteError(option, refusal == OptionReplyType.ErrorTlsRequired ? OptionReplyType.ErrorUnknown : refusal, reason);
            return;
        }

        ReleaseIfDynamic(export);

        var matchesAllocation = !set && request.Queries.Count == 0;
        var identity = false;
        foreach (var query in request.Queries)
        {
            identity |= !set && query == StableNames.MetaNamespace;
            var colon = query.IndexOf(':', StringComparison.Ordinal);
            if (colon <= 0)
            {
                WriteError(option, OptionReplyType.ErrorInvalid, $"query '{query}' does not start with a namespace and a colon");
                return;
            }

            // "base:" is a wildcard for LIST and ignored by SET; unknown leaves and namespaces are ignored.
            if (query == MetaContexts.BaseAllocation || (!set && query == MetaContexts.BaseNamespace))
            {
                matchesAllocation = true;
            }
        }

        if (identity)
        {
            // The export's stable names, for clients that make /dev/disk/by-*-style links (see ExportIdentity).
            WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(0, StableNames.MetaContext(StableNames.UuidKey, export.Uuid.ToString("D"))));
            if (export.Options.Label is { } label)
            {
                WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(0, StableNames.MetaContext(StableNames.LabelKey, label)));
            }

            if (export.Options.Serial is { } serial)
            {
                WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(0, StableNames.MetaContext(StableNames.SerialKey, serial)));
            }
        }

        if (matchesAllocation)
        {
            var id = set ? AllocationContextId : 0u;
            WriteReply(option, OptionReplyType.MetaContext, MetaContextReply.Create(id, MetaContexts.BaseAllocation));
            if (set)
            {
                _allocationSelected = true;
                _metaContextExport = request.ExportName;
            }
        }

        WriteReply(option, OptionReplyType.Ack, default);
    }

    private void EnterTransmission(Export export, string requestedName)
    {
        _export = export;
        _requestedName = requestedName;
        InTransmission = true;
        _blockStatus = _allocationSelected && _metaContextExport == requestedName;
        _flags = export.FlagsFor(_structuredReplies);
        ServerLog.ExportSelected(_logger, Id, Peer, export.Name, export.Size, _flags, _structuredReplies, _blockStatus);
    }

    /// <summary>The TLS mode of this connection: NOTLS unless the server has TLS and the client speaks fixed newstyle.</summary>
    private TlsMode TlsMode => _server.Options.Tls is { } tls && _fixedNewstyle ? tls.Mode : TlsMode.Off;

    /// <summary>
    /// Finds the export a client names and checks that this client may have it. On refusal the reply and the reason
    /// follow the spec: before TLS, a TLS-only export and an unknown one look the same (ERR_TLS_REQD, so the client
    /// learns neither existence nor size); a client outside an export's allow lists gets ERR_POLICY.
    /// </summary>
    private (Export? Export, OptionReplyType Refusal, string Reason) Resolve(string name)
    {
        var hidingUnknown = !_tlsActive && TlsMode == TlsMode.On && (_server.Catalog.Exports.Any(e => RequiresTls(e.Options)) || _server.Catalog.Directories.Any(d => RequiresTls(d.Options.Template)));
        if (!_server.Catalog.TryGet(name, out var export))
        {
            return ResolveInDirectories(name, hidingUnknown);
        }

        if (!IsVisible(export.Options))
        {
            return (null, OptionReplyType.ErrorTlsRequired, $"export '{name}' needs TLS or does not exist");
        }

        if (!IsAllowed(export.Options, out var rule))
        {
            return (null, OptionReplyType.ErrorPolicy, $"export '{export.Name}' refused by its {rule}");
        }

        return (export, default, string.Empty);
    }

    /// <summary>
    /// Looks a name up in the directory exports. An image found there holds a reference until
    /// <see cref="ReleaseIfDynamic"/>; names that are not safe paths are refused before the file system is touched.
    /// </summary>
    private (Export? Export, OptionReplyType Refusal, string Reason) ResolveInDirectories(string name, bool hidingUnknown)
    {
        foreach (var directory in _server.Catalog.Directories)
        {
            var template = directory.Options.Template;
            if (!IsVisible(template))
            {
                continue;
            }

            var found = directory.Resolve(name, SessionName);
            if (!found.Matched)
            {
                continue;
            }

            if (found.Export is null)
            {
                var refusal = found.Problem == "no such image" ? OptionReplyType.ErrorUnknown
                    : DirectoryExportProvider.IsSafeRelativeName(name, out _) ? OptionReplyType.ErrorPolicy
                    : OptionReplyType.ErrorInvalid;
                return (null, refusal, $"'{name}': {found.Problem}");
            }

            if (!IsAllowed(template, out var rule))
            {
                directory.Release(found.Export);
                return (null, OptionReplyType.ErrorPolicy, $"export '{name}' refused by its {rule}");
            }

            _dynamic.Add((found.Export, directory));
            return (found.Export, default, string.Empty);
        }

        return hidingUnknown
            ? (null, OptionReplyType.ErrorTlsRequired, $"export '{name}' needs TLS or does not exist")
            : (null, OptionReplyType.ErrorUnknown, $"no export named '{name}'");
    }

    /// <summary>Gives back an image opened from a directory export, unless it is the one in transmission.</summary>
    private void ReleaseIfDynamic(Export? export)
    {
        var index = export is null ? -1 : _dynamic.FindIndex(d => ReferenceEquals(d.Export, export));
        if (index >= 0)
        {
            _dynamic[index].Directory.Release(export!);
            _dynamic.RemoveAt(index);
        }
    }

    /// <summary>
    /// The client's session name: its TLS identity's common name, else the name configured for its address, else none.
    /// </summary>
    private string? SessionName
    {
        get
        {
            if (_identity?.CommonName is { } commonName)
            {
                return commonName;
            }

            foreach (var session in _server.Options.SessionNames)
            {
                if (session.Clients.Allows(_transport.RemoteIPEndPoint, null, out _))
                {
                    return session.Name;
                }
            }

            return null;
        }
    }

    private bool RequiresTls(ExportOptions export) => TlsMode == TlsMode.Require || (export.Tls ?? TlsMode.Off) == TlsMode.Require;

    private bool IsVisible(ExportOptions export) => _tlsActive || !RequiresTls(export);

    private bool IsAllowed(ExportOptions export, out string rule)
    {
        if (export.Access is { } access)
        {
            return access.Allows(_transport.RemoteIPEndPoint, _identity, out rule);
        }

        rule = string.Empty;
        return true;
    }

    /// <summary>
    /// NBD_OPT_STARTTLS: acknowledge in plain text, then run the TLS handshake and swap the transport. Everything
    /// negotiated before is forgotten (structured replies, metadata contexts), so nothing injected in plain text
    /// survives into the encrypted session (CVE-2021-3716).
    /// </summary>
    private async Task<NegotiationOutcome?> HandleStartTlsAsync(uint length, CancellationToken cancellationToken)
    {
        await _input.DiscardAsync(length, cancellationToken).ConfigureAwait(false);
        if (length != 0)
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
        await FlushOutputAsync(cancellationToken).ConfigureAwait(false);

        var tls = _server.Options.Tls!;
        var leftover = _input.Span.ToArray();
        _input.Consume(leftover.Length);
        var stream = new SslStream(PrefixedStream.For(_transport, leftover), leaveInnerStreamOpen: true, (_, certificate, _, _) => ValidateClient(tls, certificate));
        try
        {
            var options = new SslServerAuthenticationOptions
            {
                ServerCertificateContext = SslStreamCertificateContext.Create(tls.Certificate, tls.Chain),
                ClientCertificateRequired = tls.ClientCertificateAuthorities is not null,
                EnabledSslProtocols = tls.Protocols,
                CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            };
            if (_transport.IsBlocking)
            {
                stream.AuthenticateAsServer(options);
            }
            else
            {
                await stream.AuthenticateAsServerAsync(options, cancellationToken).ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is AuthenticationException or IOException or Win32Exception && !cancellationToken.IsCancellationRequested)
        {
            // (A handshake cut by the negotiation deadline or a stop is reported as such by the caller instead.)
            await stream.DisposeAsync().ConfigureAwait(false);
            ServerLog.TlsFailed(_logger, Id, Peer, exception.Message);
            return NegotiationOutcome.Refused;
        }

        _identity = stream.RemoteCertificate is { } remote ? ClientIdentity.FromCertificate(X509CertificateLoader.LoadCertificate(remote.GetRawCertData())) : null;
        _transport = new TlsTransport(_transport, stream);
        _input.SwitchTransport(_transport);
        _tlsActive = true;
        _structuredReplies = false;
        _allocationSelected = false;
        _metaContextExport = null;
        ServerLog.TlsStarted(_logger, Id, Peer, stream.SslProtocol.ToString(), _identity?.ToString() ?? "no client certificate");
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

    private void WriteReply(NbdOption option, OptionReplyType type, ReadOnlySpan<byte> data)
    {
        var span = _output.GetSpan(OptionReplyHeader.Length + data.Length);
        OptionReplyHeader.Write(span, option, type, (uint)data.Length);
        data.CopyTo(span[OptionReplyHeader.Length..]);
        _output.Advance(OptionReplyHeader.Length + data.Length);
    }

    /// <summary>An error reply carries a message for the user; the refusal is logged with the client's address.</summary>
    private void WriteError(NbdOption option, OptionReplyType type, string message)
    {
        ServerLog.OptionRefused(_logger, Id, Peer, Describe(option), type, message);
        var bytes = Encoding.UTF8.GetBytes(message.Length > 1024 ? message[..1024] : message);
        WriteReply(option, type, bytes);
    }

    private async ValueTask FlushOutputAsync(CancellationToken cancellationToken)
    {
        if (_output.WrittenCount == 0)
        {
            return;
        }

        await _transport.SendAsync(_output.WrittenMemory, cancellationToken).ConfigureAwait(false);
        _output.ResetWrittenCount();
    }
}
