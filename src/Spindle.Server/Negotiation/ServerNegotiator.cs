using System.Buffers;
using System.Buffers.Binary;
using System.Text;
using Microsoft.Extensions.Logging;
using Spindle.Protocol;
using Spindle.Server.Connections;
using Spindle.Server.Exports;
using Spindle.Server.Logging;
using Spindle.Server.Security;
using Spindle.Wire;

namespace Spindle.Server.Negotiation;

internal enum NegotiationOutcome
{
    Transmission,
    Aborted,
    PeerClosed,
    Refused,
    TimedOut,
    Shutdown,
}

/// <summary>
/// The handshake of one connection, fixed newstyle only (proto.md "Handshake"; the reference sheet §2 and §10): the
/// greeting, the client's flags, then option haggling until the client enters transmission (EXPORT_NAME or GO), gives
/// up (ABORT) or is refused. What it settles (the export, structured replies, metadata contexts, TLS) is read by the
/// transmission phase afterwards; this type does not take part in it.
/// </summary>
/// <remarks>Split by concern: options and replies here, exports (ServerNegotiator.Exports.cs), metadata contexts
/// (ServerNegotiator.MetaContexts.cs) and STARTTLS (ServerNegotiator.Tls.cs).</remarks>
internal sealed partial class ServerNegotiator : IDisposable
{
    private const ClientFlags KnownClientFlags = ClientFlags.FixedNewstyle | ClientFlags.NoZeroes;

    private readonly NbdServer _server;
    private readonly ServerOptions _options;
    private readonly ILogger _logger;
    private readonly ReceiveBuffer _input;
    private readonly ArrayBufferWriter<byte> _output = new(1024);
    private Transport _transport;
    private bool _clientNoZeroes;
    private bool _fixedNewstyle;
    private bool _structuredReplies;
    private int _optionCount;

    public ServerNegotiator(NbdServer server, Transport transport, ReceiveBuffer input, long id, string peer)
    {
        _server = server;
        _options = server.Options;
        _logger = server.Logger;
        _transport = transport;
        _input = input;
        Id = id;
        Peer = peer;
    }

    public long Id { get; }

    public string Peer { get; }

    /// <summary>The transport to carry on with: the one given, or TLS over it after STARTTLS.</summary>
    public Transport Transport => _transport;

    /// <summary>
    /// Whether replies may be chunks: structured replies were negotiated (NBD_OPT_STRUCTURED_REPLY), or extended
    /// headers, which take precedence over them and imply them.
    /// </summary>
    public bool StructuredReplies => _structuredReplies || ExtendedHeaders;

    /// <summary>Whether NBD_OPT_EXTENDED_HEADERS was negotiated: 32-byte requests and replies, 64-bit lengths.</summary>
    public bool ExtendedHeaders { get; private set; }

    /// <summary>
    /// The export size this connection's client was told. NBD cannot tell a client that the size changed, so its
    /// requests stay bounded by this even if the device grows (RBD online resize); a device that shrank bounds them
    /// further.
    /// </summary>
    public long NegotiatedSize { get; private set; }

    /// <summary>The export the client entered transmission with.</summary>
    public Export? Export { get; private set; }

    /// <summary>The name the client asked for (an alias or a directory image's relative name, as sent).</summary>
    public string RequestedName { get; private set; } = string.Empty;

    /// <summary>The transmission flags the client was given for <see cref="Export"/>.</summary>
    public TransmissionFlags Flags { get; private set; }

    /// <summary>
    /// Runs the handshake under <see cref="ServerOptions.HandshakeTimeout"/>. A stop of the server or
    /// <paramref name="abort"/> ends it; nothing is in flight yet, so cutting the connection then loses nothing.
    /// </summary>
    public async Task<NegotiationOutcome> RunAsync(CancellationToken abort)
    {
        using var timeout = new CancellationTokenSource(_options.HandshakeTimeout);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(timeout.Token, abort, _server.StoppingToken);

        // Whatever the transport's receives do with tokens, the deadline cuts the connection, which fails them.
        using var cut = linked.Token.UnsafeRegister(static state => ((ServerNegotiator)state!)._transport.Abort(), this);
        try
        {
            return await NegotiateAsync(linked.Token).ConfigureAwait(false);
        }
        catch (Exception exception) when (timeout.IsCancellationRequested && NbdConnection.IsDisconnect(exception))
        {
            ServerLog.HandshakeTimedOut(_logger, Id, Peer, _options.HandshakeTimeout.TotalSeconds);
            CountRefusal("handshake_timeout");
            return NegotiationOutcome.TimedOut;
        }
        catch (Exception exception) when (_server.StoppingToken.IsCancellationRequested && NbdConnection.IsDisconnect(exception))
        {
            return NegotiationOutcome.Shutdown;
        }
    }

    /// <summary>Sends the replies written and not yet sent (the last one, EXPORT_NAME's, goes out with transmission).</summary>
    public async ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        if (_output.WrittenCount == 0)
        {
            return;
        }

        await _transport.SendAsync(_output.WrittenMemory, cancellationToken).ConfigureAwait(false);
        _output.ResetWrittenCount();
    }

    public void Dispose() => ReleaseDynamicExports();

    private async Task<NegotiationOutcome> NegotiateAsync(CancellationToken cancellationToken)
    {
        ServerGreeting.Write(_output.GetSpan(ServerGreeting.Length), HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes);
        _output.Advance(ServerGreeting.Length);
        await FlushAsync(cancellationToken).ConfigureAwait(false);

        if (!await _input.TryEnsureAsync(4, cancellationToken).ConfigureAwait(false))
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
            if (!await _input.TryEnsureAsync(OptionHeader.Length, cancellationToken).ConfigureAwait(false))
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
            await FlushAsync(cancellationToken).ConfigureAwait(false);
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
            await DiscardAsync(header, cancellationToken).ConfigureAwait(false);
            WriteReply(option, OptionReplyType.Ack, default);
            ServerLog.SoftDisconnect(_logger, Id, Peer, "NBD_OPT_ABORT");
            return NegotiationOutcome.Aborted;
        }

        if (_server.IsStopping)
        {
            await DiscardAsync(header, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorShutdown, "the server is shutting down");
            return null;
        }

        if (option == NbdOption.StartTls)
        {
            return await HandleStartTlsAsync(header, cancellationToken).ConfigureAwait(false);
        }

        if (TlsMode == TlsMode.Require && !_tlsActive)
        {
            // FORCEDTLS: until TLS is up, everything but STARTTLS and ABORT is refused, unknown options included.
            await DiscardAsync(header, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorTlsRequired, "this server requires TLS: send NBD_OPT_STARTTLS first");
            return null;
        }

        if (!IsKnownOption(option))
        {
            // Unknown (or unimplemented) option: skip exactly its data so the next option parses, and say so.
            await DiscardAsync(header, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorUnsupported, $"{Describe(option)} is not supported by this server");
            return null;
        }

        if (header.DataLength > (uint)_options.MaxOptionDataLength)
        {
            await DiscardAsync(header, cancellationToken).ConfigureAwait(false);
            WriteError(option, OptionReplyType.ErrorTooBig, $"{header.DataLength} bytes of option data is more than the {_options.MaxOptionDataLength} this server accepts");
            return null;
        }

        var length = (int)header.DataLength;
        var rented = BufferPool.Shared.Rent(Math.Max(length, 1));
        try
        {
            await _input.ReadExactlyAsync(rented.AsMemory(0, length), "the option's data", cancellationToken).ConfigureAwait(false);
            return HandleBufferedOption(option, rented.AsSpan(0, length));
        }
        finally
        {
            BufferPool.Shared.Return(rented);
        }
    }

    private static bool IsKnownOption(NbdOption option) => option is NbdOption.List or NbdOption.Info
        or NbdOption.Go or NbdOption.StructuredReply or NbdOption.ListMetaContext or NbdOption.SetMetaContext
        or NbdOption.ExtendedHeaders;

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
            case NbdOption.ExtendedHeaders:
                HandleExtendedHeaders(data);
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

    private void HandleStructuredReply(ReadOnlySpan<byte> data)
    {
        if (!data.IsEmpty)
        {
            WriteError(NbdOption.StructuredReply, OptionReplyType.ErrorInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
            return;
        }

        if (ExtendedHeaders)
        {
            // The extension: extended headers take precedence; a later STRUCTURED_REPLY gets ERR_EXT_HEADER_REQD.
            WriteError(NbdOption.StructuredReply, OptionReplyType.ErrorExtendedHeaderRequired, "extended headers are already negotiated");
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

    /// <summary>
    /// NBD_OPT_EXTENDED_HEADERS (extension-ext-header): 32-byte requests with 64-bit lengths, 32-byte reply chunks,
    /// BLOCK_STATUS_EXT. Negotiated only when the client asks; everything else stays compact.
    /// </summary>
    private void HandleExtendedHeaders(ReadOnlySpan<byte> data)
    {
        if (!data.IsEmpty)
        {
            WriteError(NbdOption.ExtendedHeaders, OptionReplyType.ErrorInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data");
            return;
        }

        if (ExtendedHeaders)
        {
            WriteError(NbdOption.ExtendedHeaders, OptionReplyType.ErrorInvalid, "extended headers are already negotiated");
            return;
        }

        ExtendedHeaders = true;
        WriteReply(NbdOption.ExtendedHeaders, OptionReplyType.Ack, default);
    }

    private ValueTask DiscardAsync(OptionHeader header, CancellationToken cancellationToken) =>
        _input.DiscardAsync(header.DataLength, "the option's data", cancellationToken);

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

    private static string Describe(NbdOption option) =>
        Enum.IsDefined(option) ? "NBD_OPT_" + option switch
        {
            NbdOption.ExportName => "EXPORT_NAME",
            NbdOption.Abort => "ABORT",
            NbdOption.List => "LIST",
            NbdOption.PeekExport => "PEEK_EXPORT",
            NbdOption.StartTls => "STARTTLS",
            NbdOption.Info => "INFO",
            NbdOption.Go => "GO",
            NbdOption.StructuredReply => "STRUCTURED_REPLY",
            NbdOption.ListMetaContext => "LIST_META_CONTEXT",
            NbdOption.SetMetaContext => "SET_META_CONTEXT",
            NbdOption.ExtendedHeaders => "EXTENDED_HEADERS",
            _ => option.ToString(),
        } : $"option {(uint)option}";
}
