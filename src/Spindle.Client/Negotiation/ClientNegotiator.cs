using System.Buffers.Binary;
using Microsoft.Extensions.Logging;
using Spindle.Protocol;
using Spindle.Wire;

namespace Spindle.Client.Negotiation;

/// <summary>
/// The client side of the handshake (proto.md "Handshake"; the reference sheet §2): the greeting, then options one
/// at a time, each read to its final reply before the next is sent, ending in NBD_OPT_GO (or NBD_OPT_EXPORT_NAME
/// for servers without GO) or NBD_OPT_ABORT.
/// </summary>
internal sealed class ClientNegotiator
{
    /// <summary>Largest option reply the client accepts; NBD_REP_SERVER, the biggest normal one, is about 8 KiB.</summary>
    private const int MaxReplyLength = 1024 * 1024;

    private readonly ReceiveBuffer _receive;
    private Transport _transport;
    private readonly ILogger _logger;
    private readonly string _server;

    public ClientNegotiator(Transport transport, ReceiveBuffer receive, ILogger logger)
    {
        _transport = transport;
        _receive = receive;
        _logger = logger;
        _server = transport.RemoteDescription;
    }

    public HandshakeFlags ServerFlags { get; private set; }

    public bool FixedNewstyle => (ServerFlags & HandshakeFlags.FixedNewstyle) != 0;

    /// <summary>Both sides agreed to drop the 124 zero bytes after EXPORT_NAME.</summary>
    public bool NoZeroes { get; private set; }

    public bool StructuredReplies { get; private set; }

    /// <summary>True once NBD_OPT_EXTENDED_HEADERS was acknowledged (which implies structured replies).</summary>
    public bool ExtendedHeaders { get; private set; }

    /// <summary>The transport options go over now: the socket, or TLS after <see cref="StartTlsAsync"/>.</summary>
    public Transport Transport => _transport;

    /// <summary>True once NBD_OPT_STARTTLS succeeded and everything goes over TLS.</summary>
    public bool IsTls { get; private set; }

    /// <summary>
    /// NBD_OPT_STARTTLS, then the TLS handshake; every later option goes over TLS. Called first, right after the
    /// greeting (proto.md: a client that wants TLS SHOULD start it first). Any refusal ends the attempt: the client
    /// never goes on in plain text when TLS was asked for (the downgrade libnbd's CVE-2019-14842 allowed).
    /// </summary>
    /// <exception cref="NbdTlsException">The server does not offer TLS, or the handshake failed.</exception>
    public async Task StartTlsAsync(ClientTls tls, CancellationToken cancellationToken)
    {
        if (!FixedNewstyle)
        {
            throw new NbdTlsException($"{_server} does not speak fixed newstyle, so it cannot do TLS (NBD_OPT_STARTTLS); refusing to continue in plain text");
        }

        await SendOptionAsync(NbdOption.StartTls, [], cancellationToken).ConfigureAwait(false);
        var reply = await ReadReplyAsync(NbdOption.StartTls, cancellationToken).ConfigureAwait(false);
        if (reply.Type != OptionReplyType.Ack)
        {
            var detail = string.IsNullOrEmpty(reply.Message) ? string.Empty : $": {reply.Message}";
            throw new NbdTlsException(
                $"{_server} does not offer TLS (NBD_OPT_STARTTLS answered {ReplyName(reply.Type)}{detail}); refusing to continue in plain text (use nbd:// if plain text is acceptable)");
        }

        if (_receive.Count != 0)
        {
            // Whatever follows the ACK must be TLS from the server's side too; plain bytes here were injected.
            throw new NbdProtocolException($"{_server} sent {_receive.Count} bytes in plain text after acknowledging NBD_OPT_STARTTLS");
        }

        using var limit = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        limit.CancelAfter(tls.HandshakeTimeout);
        TlsTransport secure;
        try
        {
            secure = await tls.HandshakeAsync(_transport, limit.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new NbdTlsException($"the TLS handshake with {_server} did not finish within {tls.HandshakeTimeout.TotalSeconds:0.#} s");
        }

        _transport = secure;
        _receive.ReplaceTransport(secure);
        IsTls = true;

        // proto.md: all state negotiated before STARTTLS is forgotten; nothing but the client flags was sent.
        StructuredReplies = false;
        ExtendedHeaders = false;
        ClientLog.TlsStarted(_logger, _server, secure.Summary, tls.ToString());
    }

    /// <summary>Reads the server's greeting and answers with the client flags.</summary>
    public async Task StartAsync(CancellationToken cancellationToken)
    {
        await _receive.EnsureAsync(16, "the server's greeting", cancellationToken).ConfigureAwait(false);
        var status = ServerGreeting.TryRead(_receive.Span, out _, out var oldstyle);
        if (status == ParseStatus.Invalid)
        {
            if (oldstyle)
            {
                throw new NbdProtocolException($"{_server} speaks the oldstyle handshake, which NBD dropped in 2013; Spindle speaks fixed newstyle only");
            }

            throw new NbdProtocolException($"{_server} is not an NBD server (its greeting does not start with NBDMAGIC IHAVEOPT)");
        }

        await _receive.EnsureAsync(ServerGreeting.Length, "the server's handshake flags", cancellationToken).ConfigureAwait(false);
        ServerGreeting.TryRead(_receive.Span, out var flags, out _);
        _receive.Consume(ServerGreeting.Length);

        // The client "SHOULD ignore any handshake flags it does not recognize", and may only echo what was offered.
        ServerFlags = flags;
        var clientFlags = ClientFlags.None;
        if ((flags & HandshakeFlags.FixedNewstyle) != 0)
        {
            clientFlags |= ClientFlags.FixedNewstyle;
        }

        if ((flags & HandshakeFlags.NoZeroes) != 0)
        {
            clientFlags |= ClientFlags.NoZeroes;
            NoZeroes = true;
        }

        var bytes = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, (uint)clientFlags);
        await _transport.SendAsync(bytes, cancellationToken).ConfigureAwait(false);
        ClientLog.Greeting(_logger, _server, flags);
    }

    /// <summary>NBD_OPT_STRUCTURED_REPLY. False (and simple replies) if the server refuses.</summary>
    /// <summary>
    /// NBD_OPT_EXTENDED_HEADERS (extension-ext-header). True when the server acknowledged: requests and replies are
    /// then 32-byte headers with 64-bit lengths, and structured replies are implied. A refusal is not an error.
    /// </summary>
    public async Task<bool> RequestExtendedHeadersAsync(CancellationToken cancellationToken)
    {
        RequireFixedNewstyle(NbdOption.ExtendedHeaders);
        await SendOptionAsync(NbdOption.ExtendedHeaders, [], cancellationToken).ConfigureAwait(false);
        var reply = await ReadReplyAsync(NbdOption.ExtendedHeaders, cancellationToken).ConfigureAwait(false);
        if (reply.Type == OptionReplyType.Ack)
        {
            ExtendedHeaders = true;
            StructuredReplies = true;
            return true;
        }

        ThrowIfFinalError(NbdOption.ExtendedHeaders, reply, refusable: true);
        if (!reply.IsError)
        {
            throw Unexpected(NbdOption.ExtendedHeaders, reply);
        }

        ClientLog.OptionRefused(_logger, _server, OptionName(NbdOption.ExtendedHeaders), reply.Type, reply.Message);
        return false;
    }

    public async Task<bool> RequestStructuredRepliesAsync(CancellationToken cancellationToken)
    {
        RequireFixedNewstyle(NbdOption.StructuredReply);
        await SendOptionAsync(NbdOption.StructuredReply, [], cancellationToken).ConfigureAwait(false);
        var reply = await ReadReplyAsync(NbdOption.StructuredReply, cancellationToken).ConfigureAwait(false);
        if (reply.Type == OptionReplyType.Ack)
        {
            StructuredReplies = true;
            return true;
        }

        ThrowIfFinalError(NbdOption.StructuredReply, reply, refusable: true);
        if (!reply.IsError)
        {
            throw Unexpected(NbdOption.StructuredReply, reply);
        }

        ClientLog.OptionRefused(_logger, _server, OptionName(NbdOption.StructuredReply), reply.Type, reply.Message);
        return false;
    }

    /// <summary>
    /// NBD_OPT_SET_META_CONTEXT (or LIST_META_CONTEXT): the contexts the server selected (or offers), by name. An
    /// error reply means none.
    /// </summary>
    public async Task<Dictionary<string, uint>> MetaContextAsync(NbdOption option, string exportName, IReadOnlyList<string> queries, CancellationToken cancellationToken)
    {
        RequireFixedNewstyle(option);
        await SendOptionAsync(option, new MetaContextRequest(exportName, queries).ToBytes(), cancellationToken).ConfigureAwait(false);
        var contexts = new Dictionary<string, uint>(StringComparer.Ordinal);
        var ids = new HashSet<uint>();
        for (var count = 0; ; count++)
        {
            var reply = await ReadReplyAsync(option, cancellationToken).ConfigureAwait(false);
            switch (reply.Type)
            {
                case OptionReplyType.MetaContext:
                    if (!MetaContextReply.TryParse(reply.Data, out var id, out var name) || name.Length == 0)
                    {
                        throw new NbdProtocolException($"{_server} sent a malformed NBD_REP_META_CONTEXT ({reply.Data.Length} bytes)");
                    }

                    if (count >= 65536)
                    {
                        throw new NbdProtocolException($"{_server} sent more than 65536 meta contexts");
                    }

                    // Ids are per connection and unique among the selected contexts (LIST answers SHOULD use 0).
                    if (option == NbdOption.SetMetaContext && !ids.Add(id))
                    {
                        throw new NbdProtocolException($"{_server} gave meta context id {id} to two contexts");
                    }

                    contexts[name] = id;
                    break;
                case OptionReplyType.Ack:
                    return contexts;
                default:
                    ThrowIfFinalError(option, reply, refusable: true);
                    if (!reply.IsError)
                    {
                        throw Unexpected(option, reply);
                    }

                    // SET_META_CONTEXT replaces every selection even when it fails: nothing is selected now.
                    ClientLog.OptionRefused(_logger, _server, OptionName(option), reply.Type, reply.Message);
                    return [];
            }
        }
    }

    /// <summary>NBD_OPT_LIST: the exports the server names.</summary>
    public async Task<List<(string Name, string Description)>> ListAsync(CancellationToken cancellationToken)
    {
        RequireFixedNewstyle(NbdOption.List);
        await SendOptionAsync(NbdOption.List, [], cancellationToken).ConfigureAwait(false);
        var exports = new List<(string, string)>();
        while (true)
        {
            var reply = await ReadReplyAsync(NbdOption.List, cancellationToken).ConfigureAwait(false);
            switch (reply.Type)
            {
                case OptionReplyType.Server:
                    if (!ServerReply.TryParse(reply.Data, out var name, out var description))
                    {
                        throw new NbdProtocolException($"{_server} sent a malformed NBD_REP_SERVER ({reply.Data.Length} bytes)");
                    }

                    if (exports.Count >= 100_000)
                    {
                        throw new NbdProtocolException($"{_server} listed more than 100000 exports");
                    }

                    exports.Add((name, description));
                    break;
                case OptionReplyType.Ack:
                    return exports;
                default:
                    ThrowIfFinalError(NbdOption.List, reply, refusable: false);
                    throw Unexpected(NbdOption.List, reply);
            }
        }
    }

    /// <summary>
    /// NBD_OPT_INFO or NBD_OPT_GO for <paramref name="exportName"/>. Returns null if the server does not know the
    /// option (NBD_REP_ERR_UNSUP): GO then falls back to EXPORT_NAME.
    /// </summary>
    public async Task<InfoResult?> InfoOrGoAsync(NbdOption option, string exportName, CancellationToken cancellationToken)
    {
        RequireFixedNewstyle(option);
        var request = new InfoRequest(exportName, [InfoType.BlockSize, InfoType.Name, InfoType.Description]);
        await SendOptionAsync(option, request.ToBytes(), cancellationToken).ConfigureAwait(false);
        var result = new InfoResult();
        while (true)
        {
            var reply = await ReadReplyAsync(option, cancellationToken).ConfigureAwait(false);
            switch (reply.Type)
            {
                case OptionReplyType.Info:
                    ReadInfo(reply.Data, result);
                    break;
                case OptionReplyType.Ack:
                    if (!result.HasExport)
                    {
                        throw new NbdProtocolException($"{_server} acknowledged {OptionName(option)} without sending NBD_INFO_EXPORT");
                    }

                    return result;
                case OptionReplyType.ErrorUnsupported when option == NbdOption.Go && ExtendedHeaders:
                    // The extension: after extended headers the server MUST support GO (EXPORT_NAME is then forbidden).
                    throw new NbdProtocolException($"{_server} acknowledged extended headers but does not support NBD_OPT_GO");
                case OptionReplyType.ErrorUnsupported:
                    ClientLog.OptionRefused(_logger, _server, OptionName(option), reply.Type, reply.Message);
                    if (option == NbdOption.Go)
                    {
                        ClientLog.FallingBackToExportName(_logger, _server);
                    }

                    return null;
                default:
                    ThrowIfFinalError(option, reply, refusable: false, exportName);
                    throw Unexpected(option, reply);
            }
        }
    }

    /// <summary>
    /// Learns the stable names of <paramref name="exportName"/>: from a Spindle server's <c>x-spindle:</c> meta contexts
    /// when structured replies are on, otherwise (or when none are answered) with standard options: NBD_OPT_INFO gives its
    /// canonical name (NBD_INFO_NAME), NBD_OPT_LIST names the aliases (<c>by-uuid/...</c>, <c>by-label/...</c>,
    /// <c>by-serial/...</c>), and NBD_OPT_INFO on each alias tells which of them resolve to the same canonical name.
    /// Null when the server gives no canonical name, refuses LIST or lists no alias of the export.
    /// </summary>
    public async Task<ExportIdentity?> DiscoverIdentityAsync(string exportName, bool structured, CancellationToken cancellationToken)
    {
        const int MaxProbes = 4096;
        if (structured && await DescribedIdentityAsync(exportName, cancellationToken).ConfigureAwait(false) is { } described)
        {
            return described;
        }

        var own = await InfoOrGoAsync(NbdOption.Info, exportName, cancellationToken).ConfigureAwait(false);
        var canonical = own?.CanonicalName;
        if (canonical is null)
        {
            return null;
        }

        List<(string Name, string Description)> names;
        try
        {
            names = await ListAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (NbdOptionException exception) when (exception.Reply != OptionReplyType.ErrorShutdown)
        {
            return null;
        }

        string? uuid = null, label = null, serial = null;
        var probes = 0;
        foreach (var (name, _) in names)
        {
            var (prefix, found) = name switch
            {
                _ when name.StartsWith(ExportIdentity.UuidPrefix, StringComparison.Ordinal) => (ExportIdentity.UuidPrefix, uuid),
                _ when name.StartsWith(ExportIdentity.LabelPrefix, StringComparison.Ordinal) => (ExportIdentity.LabelPrefix, label),
                _ when name.StartsWith(ExportIdentity.SerialPrefix, StringComparison.Ordinal) => (ExportIdentity.SerialPrefix, serial),
                _ => (null, null),
            };
            if (prefix is null || found is not null || name.Length == prefix.Length || probes++ >= MaxProbes)
            {
                continue;
            }

            InfoResult? alias;
            try
            {
                alias = await InfoOrGoAsync(NbdOption.Info, name, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception exception) when (exception is NbdOptionException { Reply: not OptionReplyType.ErrorShutdown } or NbdTlsException)
            {
                continue;
            }

            if (alias?.CanonicalName != canonical)
            {
                continue;
            }

            var value = name[prefix.Length..];
            switch (prefix)
            {
                case ExportIdentity.UuidPrefix:
                    uuid = value;
                    break;
                case ExportIdentity.LabelPrefix:
                    label = value;
                    break;
                default:
                    serial = value;
                    break;
            }
        }

        var identity = new ExportIdentity(uuid, label, serial);
        return identity.IsEmpty ? null : identity;
    }

    /// <summary>
    /// Spindle servers describe an export's stable names as meta contexts answering NBD_OPT_LIST_META_CONTEXT with the
    /// query <c>x-spindle:</c> (<c>x-spindle:uuid=UUID</c>, <c>label=</c>, <c>serial=</c>), which works whether or not
    /// the server lists aliases. Null when the server answers none (another server, or an export without names).
    /// </summary>
    private async Task<ExportIdentity?> DescribedIdentityAsync(string exportName, CancellationToken cancellationToken)
    {
        Dictionary<string, uint> answered;
        try
        {
            answered = await MetaContextAsync(NbdOption.ListMetaContext, exportName, [StableNames.MetaNamespace], cancellationToken).ConfigureAwait(false);
        }
        catch (NbdOptionException exception) when (exception.Reply != OptionReplyType.ErrorShutdown)
        {
            return null;
        }

        string? uuid = null, label = null, serial = null;
        foreach (var name in answered.Keys)
        {
            if (!StableNames.TryParseMetaContext(name, out var key, out var value))
            {
                continue;
            }

            switch (key)
            {
                case StableNames.UuidKey:
                    uuid ??= value;
                    break;
                case StableNames.LabelKey:
                    label ??= value;
                    break;
                case StableNames.SerialKey:
                    serial ??= value;
                    break;
            }
        }

        var identity = new ExportIdentity(uuid, label, serial);
        return identity.IsEmpty ? null : identity;
    }

    /// <summary>NBD_OPT_EXPORT_NAME: the one option whose failure is a closed connection.</summary>
    public async Task<InfoResult> ExportNameAsync(string exportName, CancellationToken cancellationToken)
    {
        var name = new byte[NbdString.ByteCount(exportName)];
        NbdString.Encode(exportName, name);
        await SendOptionAsync(NbdOption.ExportName, name, cancellationToken).ConfigureAwait(false);
        try
        {
            await _receive.EnsureAsync(ExportNameReply.ShortLength, "the reply to NBD_OPT_EXPORT_NAME", cancellationToken).ConfigureAwait(false);
        }
        catch (EndOfStreamException)
        {
            // NBD_OPT_EXPORT_NAME has no error reply: a server that cannot serve the export closes the connection.
            throw new NbdOptionException(NbdOption.ExportName, OptionReplyType.ErrorUnknown,
                $"{_server} closed the connection when asked for export '{exportName}' with NBD_OPT_EXPORT_NAME: it has no such export or refused it");
        }

        ExportNameReply.TryRead(_receive.Span, out var size, out var flags);
        _receive.Consume(ExportNameReply.ShortLength);
        if (!NoZeroes)
        {
            await _receive.EnsureAsync(NbdLimits.ExportNameReplyPadding, "the zero padding after the export name reply", cancellationToken).ConfigureAwait(false);
            _receive.Consume(NbdLimits.ExportNameReplyPadding);
        }

        var result = new InfoResult();
        result.SetExport(size, flags, _server);
        return result;
    }

    /// <summary>
    /// NBD_OPT_ABORT, a soft disconnect. The ACK is awaited briefly; a server that closes without it (nbd-server
    /// does) is fine.
    /// </summary>
    public async Task AbortAsync(CancellationToken cancellationToken)
    {
        using var limit = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        limit.CancelAfter(TimeSpan.FromSeconds(2));
        try
        {
            await SendOptionAsync(NbdOption.Abort, [], limit.Token).ConfigureAwait(false);
            await ReadReplyAsync(NbdOption.Abort, limit.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            // No ACK in time: the client is leaving anyway.
        }
        catch (Exception exception) when (exception is IOException or System.Net.Sockets.SocketException or ObjectDisposedException)
        {
            // The server closed first (NbdException is an IOException too): any ending is acceptable.
        }
    }

    private void ReadInfo(byte[] data, InfoResult result)
    {
        if (!InfoReplies.TryReadType(data, out var type))
        {
            throw new NbdProtocolException($"{_server} sent an NBD_REP_INFO of {data.Length} bytes, too short for its type");
        }

        switch (type)
        {
            case InfoType.Export:
                if (!InfoReplies.TryReadExport(data, out var size, out var flags))
                {
                    throw new NbdProtocolException($"{_server} sent NBD_INFO_EXPORT of {data.Length} bytes; the spec says exactly 12");
                }

                result.SetExport(size, flags, _server);
                break;
            case InfoType.BlockSize:
                if (!InfoReplies.TryReadBlockSize(data, out var sizes))
                {
                    throw new NbdProtocolException($"{_server} sent NBD_INFO_BLOCK_SIZE of {data.Length} bytes; the spec says exactly 14");
                }

                if (!sizes.IsValid(out var problem))
                {
                    throw new NbdProtocolException($"{_server} advertised impossible block sizes: {problem}");
                }

                result.BlockSizes = sizes;
                break;
            case InfoType.Name:
                result.CanonicalName = NbdString.TryDecode(data.AsSpan(2), out var name, out _) ? name : null;
                break;
            case InfoType.Description:
                result.Description = NbdString.TryDecode(data.AsSpan(2), out var description, out _) ? description : null;
                break;
            default:
                // "the client MUST ignore information replies it does not understand".
                break;
        }
    }

    private void RequireFixedNewstyle(NbdOption option)
    {
        if (!FixedNewstyle)
        {
            throw new NbdOptionException(option, OptionReplyType.ErrorUnsupported,
                $"{_server} does not speak fixed newstyle, so only NBD_OPT_EXPORT_NAME may be sent to it, not {OptionName(option)}");
        }
    }

    /// <summary>Throws for final errors that end the attempt; returns for an error the caller may tolerate.</summary>
    private void ThrowIfFinalError(NbdOption option, OptionReply reply, bool refusable, string? exportName = null)
    {
        if (!reply.IsError)
        {
            return;
        }

        var detail = string.IsNullOrEmpty(reply.Message) ? string.Empty : $": {reply.Message}";
        switch (reply.Type)
        {
            case OptionReplyType.ErrorTlsRequired when IsTls:
                throw new NbdProtocolException($"{_server} answered {OptionName(option)} with NBD_REP_ERR_TLS_REQD although TLS is up");
            case OptionReplyType.ErrorTlsRequired:
                throw new NbdTlsException(exportName is null || option is not (NbdOption.Info or NbdOption.Go)
                    ? $"{_server} requires TLS ({OptionName(option)} answered NBD_REP_ERR_TLS_REQD{detail}): use an nbds:// URI (with ?tls-certificates=DIR for its CA)"
                    : $"{_server} serves export '{exportName}' only over TLS, or has no such export ({OptionName(option)} answered NBD_REP_ERR_TLS_REQD{detail}): use an nbds:// URI (with ?tls-certificates=DIR for its CA)");
            case OptionReplyType.ErrorUnknown when exportName is not null:
                throw new NbdOptionException(option, reply.Type, $"{_server} has no export named '{exportName}' (NBD_REP_ERR_UNKNOWN{detail})");
            case OptionReplyType.ErrorPolicy when option == NbdOption.List:
                throw new NbdOptionException(option, reply.Type, $"{_server} does not allow listing its exports (NBD_REP_ERR_POLICY{detail})");
            case OptionReplyType.ErrorPolicy when exportName is not null:
                throw new NbdOptionException(option, reply.Type, $"{_server} refused access to export '{exportName}' (NBD_REP_ERR_POLICY{detail})");
        }

        if (!refusable)
        {
            throw new NbdOptionException(option, reply.Type, $"{_server} refused {OptionName(option)} with {ReplyName(reply.Type)}{detail}");
        }
    }

    private NbdProtocolException Unexpected(NbdOption option, OptionReply reply) =>
        new($"{_server} answered {OptionName(option)} with unexpected reply type {ReplyName(reply.Type)}");

    private async Task SendOptionAsync(NbdOption option, byte[] data, CancellationToken cancellationToken)
    {
        var bytes = new byte[OptionHeader.Length + data.Length];
        OptionHeader.Write(bytes, option, (uint)data.Length);
        data.CopyTo(bytes, OptionHeader.Length);
        await _transport.SendAsync(bytes, cancellationToken).ConfigureAwait(false);
        ClientLog.OptionSent(_logger, _server, OptionName(option), data.Length);
    }

    private async Task<OptionReply> ReadReplyAsync(NbdOption option, CancellationToken cancellationToken)
    {
        var what = $"the reply to {OptionName(option)}";
        await _receive.EnsureAsync(OptionReplyHeader.Length, what, cancellationToken).ConfigureAwait(false);
        if (OptionReplyHeader.TryRead(_receive.Span, out var header) != ParseStatus.Done)
        {
            throw new NbdProtocolException($"{_server} sent an option reply with a wrong magic number (expected 0x0003e889045565a9) in answer to {OptionName(option)}");
        }

        if (header.Option != option)
        {
            throw new NbdProtocolException($"{_server} answered {OptionName(option)} with a reply for option {(uint)header.Option}");
        }

        if (header.DataLength > MaxReplyLength)
        {
            throw new NbdProtocolException($"{_server} sent a {header.DataLength}-byte reply to {OptionName(option)}, over the client's {MaxReplyLength}-byte limit");
        }

        _receive.Consume(OptionReplyHeader.Length);
        var data = new byte[header.DataLength];
        await _receive.ReadExactlyAsync(data, what, cancellationToken).ConfigureAwait(false);
        var message = string.Empty;
        if (header.IsError && data.Length > 0)
        {
            message = NbdString.TryDecode(data, out var text, out _) ? text : string.Empty;
        }

        if (header.Type == OptionReplyType.ErrorShutdown && option != NbdOption.Abort)
        {
            // "the client MUST soft-disconnect": leave with NBD_OPT_ABORT before reporting it.
            await AbortAsync(cancellationToken).ConfigureAwait(false);
            var detail = string.IsNullOrEmpty(message) ? string.Empty : $": {message}";
            throw new NbdOptionException(option, header.Type, $"{_server} is shutting down (it answered {OptionName(option)} with NBD_REP_ERR_SHUTDOWN{detail})");
        }

        return new OptionReply(header.Type, data, message);
    }

    internal static string OptionName(NbdOption option) => option switch
    {
        NbdOption.ExportName => "NBD_OPT_EXPORT_NAME",
        NbdOption.Abort => "NBD_OPT_ABORT",
        NbdOption.List => "NBD_OPT_LIST",
        NbdOption.StartTls => "NBD_OPT_STARTTLS",
        NbdOption.Info => "NBD_OPT_INFO",
        NbdOption.Go => "NBD_OPT_GO",
        NbdOption.StructuredReply => "NBD_OPT_STRUCTURED_REPLY",
        NbdOption.ListMetaContext => "NBD_OPT_LIST_META_CONTEXT",
        NbdOption.SetMetaContext => "NBD_OPT_SET_META_CONTEXT",
        NbdOption.ExtendedHeaders => "NBD_OPT_EXTENDED_HEADERS",
        _ => $"option {(uint)option}",
    };

    internal static string ReplyName(OptionReplyType type) => type switch
    {
        OptionReplyType.Ack => "NBD_REP_ACK",
        OptionReplyType.Server => "NBD_REP_SERVER",
        OptionReplyType.Info => "NBD_REP_INFO",
        OptionReplyType.MetaContext => "NBD_REP_META_CONTEXT",
        OptionReplyType.ErrorUnsupported => "NBD_REP_ERR_UNSUP",
        OptionReplyType.ErrorPolicy => "NBD_REP_ERR_POLICY",
        OptionReplyType.ErrorInvalid => "NBD_REP_ERR_INVALID",
        OptionReplyType.ErrorPlatform => "NBD_REP_ERR_PLATFORM",
        OptionReplyType.ErrorTlsRequired => "NBD_REP_ERR_TLS_REQD",
        OptionReplyType.ErrorUnknown => "NBD_REP_ERR_UNKNOWN",
        OptionReplyType.ErrorShutdown => "NBD_REP_ERR_SHUTDOWN",
        OptionReplyType.ErrorBlockSizeRequired => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        OptionReplyType.ErrorTooBig => "NBD_REP_ERR_TOO_BIG",
        OptionReplyType.ErrorExtendedHeaderRequired => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => $"reply type 0x{(uint)type:x8}",
    };

    private readonly record struct OptionReply(OptionReplyType Type, byte[] Data, string Message)
    {
        public bool IsError => ((uint)Type & 0x80000000) != 0;
    }
}

/// <summary>What NBD_OPT_INFO / NBD_OPT_GO / NBD_OPT_EXPORT_NAME told the client.</summary>
internal sealed class InfoResult
{
    public bool HasExport { get; private set; }

    public long Size { get; private set; }

    public TransmissionFlags Flags { get; private set; }

    public BlockSizeConstraints? BlockSizes { get; set; }

    public string? CanonicalName { get; set; }

    public string? Description { get; set; }

    public void SetExport(ulong size, TransmissionFlags flags, string server)
    {
        if (size > long.MaxValue)
        {
            throw new NbdProtocolException($"{server} reported an export size of {size} bytes, beyond 2^63");
        }

        HasExport = true;
        Size = (long)size;
        Flags = flags;
    }
}
