using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Spindle.Server.Diagnostics;
using Spindle.Server.Exports;
using Spindle.Server.Logging;
using Spindle.Server.Negotiation;
using Spindle.Wire;

namespace Spindle.Server.Connections;

/// <summary>
/// One client connection: the handshake (<see cref="ServerNegotiator"/>), then the transmission phase
/// (NbdConnection.Transmission.cs) until the client disconnects or the server stops.
/// </summary>
internal sealed partial class NbdConnection : IAsyncDisposable
{
    private readonly NbdServer _server;
    private readonly ServerOptions _options;
    private readonly ILogger _logger;
    private readonly CancellationTokenSource _abort = new();
    private readonly ReceiveBuffer _input;
    private readonly ServerNegotiator _negotiator;
    private Transport _transport;
    private Export? _export;

    public NbdConnection(NbdServer server, Transport transport, long id)
    {
        _server = server;
        _options = server.Options;
        _logger = server.Logger;
        _transport = transport;
        _input = new ReceiveBuffer(transport, ReceiveBufferOptions.Server);
        Id = id;
        Peer = transport.RemoteDescription;
        TransportKind = transport.RemoteIPEndPoint is not null ? "tcp" : Peer == "unix" ? "unix" : "other";
        ConnectedAt = DateTimeOffset.UtcNow;
        _negotiator = new ServerNegotiator(server, transport, _input, id, Peer);
    }

    /// <summary>"tcp", "unix" or "other" (an in-memory or test transport): the <c>transport</c> tag of the metrics.</summary>
    public string TransportKind { get; }

    public DateTimeOffset ConnectedAt { get; }

    /// <summary>Requests answered on this connection, by command (added to the export's when it ends).</summary>
    public CommandCounters Counters { get; } = new();

    /// <summary>Whether STARTTLS succeeded, and the client certificate's identity if it sent one.</summary>
    public bool Tls => _negotiator.TlsActive;

    public string? TlsIdentity => _negotiator.Identity?.ToString();

    /// <summary>Requests and payload bytes in flight now (zero outside transmission).</summary>
    public (int Requests, long Bytes) InFlight => _budget is { } budget ? (budget.Requests, budget.Bytes) : (0, 0);

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
            var outcome = await _negotiator.RunAsync(_abort.Token).ConfigureAwait(false);
            _transport = _negotiator.Transport;
            if (outcome == NegotiationOutcome.Transmission)
            {
                _export = _negotiator.Export;
                _export!.Attach(Counters);
                InTransmission = true;
                reason = await RunTransmissionAsync().ConfigureAwait(false);
            }
            else
            {
                reason = outcome.ToString();
                if (outcome == NegotiationOutcome.Refused && !_negotiator.RefusalCounted)
                {
                    _server.CountRefusal("protocol_error");
                }
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

        // After STARTTLS the negotiator's transport is TLS over the same socket; aborting it reaches the socket.
        _negotiator.Transport.Abort();
    }

    public async ValueTask DisposeAsync()
    {
        if (_export is not null && InTransmission)
        {
            _export.Detach(Counters);
            _export.OnDisconnected();
            InTransmission = false;
        }

        await ReleaseOwnDeviceAsync().ConfigureAwait(false);
        _negotiator.Dispose();
        _input.Dispose();
        await _negotiator.Transport.DisposeAsync().ConfigureAwait(false);
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
}
