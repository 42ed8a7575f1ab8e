using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Server.Logging;
using Spindle.Server.Security;

namespace Spindle.Server.Negotiation;

/// <summary>Choosing an export: EXPORT_NAME, LIST, INFO and GO, and who may see and use which export.</summary>
internal sealed partial class ServerNegotiator
{
    private readonly List<(Export Export, DirectoryExportProvider Directory)> _dynamic = [];

    private async Task<NegotiationOutcome?> HandleExportNameAsync(uint length, CancellationToken cancellationToken)
    {
        // EXPORT_NAME has no error reply: when it cannot be satisfied the only answer is to close.
        if (length > NbdLimits.MaxStringLength)
        {
            ServerLog.ProtocolViolation(_logger, Id, Peer, $"NBD_OPT_EXPORT_NAME with a {length}-byte name");
            return NegotiationOutcome.Refused;
        }

        var bytes = new byte[length];
        await _input.ReadExactlyAsync(bytes, "the export name", cancellationToken).ConfigureAwait(false);
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
            CountRefusal("tls_required");
            return NegotiationOutcome.Refused;
        }

        if (ExtendedHeaders)
        {
            // The extension: after extended headers the client MUST NOT use EXPORT_NAME (it has no way to say which
            // header form the export-name reply would take); the option cannot report errors, so the answer is to close.
            ServerLog.ProtocolViolation(_logger, Id, Peer, "NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS");
            return NegotiationOutcome.Refused;
        }

        var (export, refusal, reason) = Resolve(name);
        if (export is null || !export.TryConnect())
        {
            ReleaseIfDynamic(export);
            reason = export is null ? reason : BusyReason(export);
            CountRefusal(export is null ? RefusalReason(refusal) : "export_busy");
            ServerLog.OptionRefused(_logger, Id, Peer, "NBD_OPT_EXPORT_NAME", export is null ? refusal : OptionReplyType.ErrorPolicy, reason + "; closing, as EXPORT_NAME cannot report errors");
            return NegotiationOutcome.Refused;
        }

        var flags = export.FlagsFor(StructuredReplies, ExtendedHeaders);
        var size = export.Size;
        var span = _output.GetSpan(ExportNameReply.FullLength);
        _output.Advance(ExportNameReply.Write(span, (ulong)size, flags, _clientNoZeroes));
        EnterTransmission(export, name, size);
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
            if (option == NbdOption.Go)
            {
                CountRefusal(RefusalReason(refusal));
            }

            WriteError(option, refusal, reason);
            return null;
        }

        if (option == NbdOption.Go && !export.TryConnect())
        {
            ReleaseIfDynamic(export);
            CountRefusal("export_busy");
            WriteError(option, OptionReplyType.ErrorPolicy, BusyReason(export));
            return null;
        }

        Span<byte> info = stackalloc byte[InfoReplies.BlockSizeLength];
        var flags = export.FlagsFor(StructuredReplies, ExtendedHeaders);

        // Read once: the size a client is told is the size its connection is held to (a device can grow meanwhile).
        var size = export.Size;
        WriteReply(option, OptionReplyType.Info, info[..InfoReplies.WriteExport(info, (ulong)size, flags)]);
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
            EnterTransmission(export, request.ExportName, size);
            return NegotiationOutcome.Transmission;
        }

        // INFO only looked: an image opened from a directory for it is given back.
        ReleaseIfDynamic(export);
        return null;
    }

    private void EnterTransmission(Export export, string requestedName, long size)
    {
        Export = export;
        NegotiatedSize = size;
        RequestedName = requestedName;
        Flags = export.FlagsFor(StructuredReplies, ExtendedHeaders);
        if (_contextExport != requestedName)
        {
            // Contexts chosen for another name do not carry over (proto.md: SET_META_CONTEXT names the export).
            _selected.Clear();
        }
        else
        {
            RebindContexts(export);
        }

        ServerLog.ExportSelected(_logger, Id, Peer, export.Name, size, Flags, StructuredReplies, ExtendedHeaders, _selected.Count > 0);
    }

    /// <summary>The TLS mode of this connection: NOTLS unless the server has TLS and the client speaks fixed newstyle.</summary>
    /// <summary>Why an export that exists takes no more connections.</summary>
    private static string BusyReason(Export export) => export.IsRetired
        ? $"export '{export.Name}' has just been removed or changed; ask again"
        : $"export '{export.Name}' already has its {export.Options.MaxConnections} connections";

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

    /// <summary>Gives back every image opened from a directory export (the connection has ended).</summary>
    private void ReleaseDynamicExports()
    {
        foreach (var (export, directory) in _dynamic)
        {
            directory.Release(export);
        }

        _dynamic.Clear();
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
}
