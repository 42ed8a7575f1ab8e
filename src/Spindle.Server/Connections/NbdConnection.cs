using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Server.Logging;
using Spindle.Server.Transport;

namespace Spindle.Server.Connections;

/// <summary>
/// One client connection: the handshake (NbdConnection.Negotiation.cs), then the transmission phase
/// (NbdConnection.Transmission.cs) until the client disconnects or the server stops.
/// </summary>
internal sealed partial class NbdConnection : IAsyncDisposable
{
    private readonly NbdServer _server;
    private readonly ServerOptions _options;
    private readonly ILogger _logger;
    private readonly CancellationTokenSource _abort = new();
    private ConnectionTransport _transport;
    private readonly ReceiveBuffer _input;

    public NbdConnection(NbdServer server, ConnectionTransport transport, long id)
    {
        _server = server;
        _options = server.Options;
        _logger = server.Logger;
        _transport = transport;
        _input = new ReceiveBuffer(transport);
        Id = id;
        Peer = transport.RemoteDescription;
    }

    public long Id { get; }

    public string Peer { get; }

    /// <summary>The export chosen by the client, once in transmission.</summary>
    public Export? Export => _export;

    /// <summary>True once the connection entered the transmission phase.</summary>
    public bool InTransmission { get; private set; }

    /// <summary>Runs the connection to its end. Never throws: every failure is logged and closes this connection only.</summary>
    public async Task RunAsync()
    {
        var reason = "done";
        try
        {
            ServerLog.Connected(_logger, Id, Peer);
            var outcome = await NegotiateWithTimeoutAsync().ConfigureAwait(false);
            if (outcome == NegotiationOutcome.Transmission)
            {
                reason = await RunTransmissionAsync().ConfigureAwait(false);
            }
            else
            {
                reason = outcome.ToString();
            }
        }
        catch (Exception exception) when (IsDisconnect(exception))
        {
            reason = "peer disconnected";
            ServerLog.PeerClosed(_logger, Id, Peer);
        }
        catch (Exception exception)
        {
            reason = "error";
            ServerLog.ConnectionFailed(_logger, Id, Peer, exception);
        }
        finally
        {
            ServerLog.Closed(_logger, Id, Peer, reason);
            await DisposeAsync().ConfigureAwait(false);
        }
    }

    /// <summary>Cuts the connection at once (shutdown timeout, or a fault on the other direction).</summary>
    public void Abort()
    {
        try
        {
            _abort.Cancel();
        }
        catch (ObjectDisposedException)
        {
        }

        _transport.Abort();
    }

    public async ValueTask DisposeAsync()
    {
        if (_export is not null && InTransmission)
        {
            _export.OnDisconnected();
            InTransmission = false;
        }

        foreach (var (export, directory) in _dynamic)
        {
            directory.Release(export);
        }

        _dynamic.Clear();

        _input.Dispose();
        await _transport.DisposeAsync().ConfigureAwait(false);
        _abort.Dispose();
    }

    /// <summary>Errors that just mean the peer went away or the connection was cut: not worth a stack trace.</summary>
    internal static bool IsDisconnect(Exception exception) => exception switch
    {
        EndOfStreamException => true,
        ObjectDisposedException => true,
        OperationCanceledException => true,
        SocketException socket => socket.SocketErrorCode is SocketError.ConnectionReset or SocketError.ConnectionAborted
            or SocketError.Shutdown or SocketError.OperationAborted or SocketError.TimedOut,
        IOException { InnerException: { } inner } => IsDisconnect(inner),
        _ => false,
    };

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
