using Microsoft.Extensions.Logging;
using Spindle.Protocol;

namespace Spindle.Server.Logging;

/// <summary>Every server log message, with a stable event id and the connection id and peer address.</summary>
internal static partial class ServerLog
{
    [LoggerMessage(1, LogLevel.Information, "Listening on {Endpoint}")]
    public static partial void Listening(ILogger logger, string endpoint);

    [LoggerMessage(2, LogLevel.Information, "Stopped listening on {Endpoint}")]
    public static partial void StoppedListening(ILogger logger, string endpoint);

    [LoggerMessage(3, LogLevel.Warning, "Accept on {Endpoint} failed, retrying: {Message}")]
    public static partial void AcceptFailed(ILogger logger, string endpoint, string message);

    [LoggerMessage(4, LogLevel.Debug, "[{ConnectionId}] {Peer}: connected")]
    public static partial void Connected(ILogger logger, long connectionId, string peer);

    [LoggerMessage(5, LogLevel.Warning, "{Peer}: refused, {Count} connections is the limit")]
    public static partial void TooManyConnections(ILogger logger, string peer, int count);

    [LoggerMessage(6, LogLevel.Debug, "[{ConnectionId}] {Peer}: closed ({Reason})")]
    public static partial void Closed(ILogger logger, long connectionId, string peer, string reason);

    [LoggerMessage(7, LogLevel.Warning, "[{ConnectionId}] {Peer}: handshake not finished within {Seconds} s, disconnecting")]
    public static partial void HandshakeTimedOut(ILogger logger, long connectionId, string peer, double seconds);

    [LoggerMessage(8, LogLevel.Warning, "[{ConnectionId}] {Peer}: protocol violation, disconnecting: {Reason}")]
    public static partial void ProtocolViolation(ILogger logger, long connectionId, string peer, string reason);

    [LoggerMessage(9, LogLevel.Information, "[{ConnectionId}] {Peer}: option {Option} refused with {Reply}: {Reason}")]
    public static partial void OptionRefused(ILogger logger, long connectionId, string peer, string option, OptionReplyType reply, string reason);

    [LoggerMessage(10, LogLevel.Information, "[{ConnectionId}] {Peer}: export {Export} ({Size} bytes, flags {Flags}), structured replies {Structured}, extended headers {Extended}, block status {BlockStatus}")]
    public static partial void ExportSelected(ILogger logger, long connectionId, string peer, string export, long size, TransmissionFlags flags, bool structured, bool extended, bool blockStatus);

    [LoggerMessage(11, LogLevel.Warning, "[{ConnectionId}] {Peer}: {Request} refused with {Error}: {Reason}")]
    public static partial void RequestRefused(ILogger logger, long connectionId, string peer, NbdRequest request, string error, string reason);

    [LoggerMessage(12, LogLevel.Error, "[{ConnectionId}] {Peer}: {Request} failed with {Error}: {Reason}")]
    public static partial void RequestFailed(ILogger logger, long connectionId, string peer, NbdRequest request, string error, string reason);

    [LoggerMessage(13, LogLevel.Error, "[{ConnectionId}] {Peer}: connection failed")]
    public static partial void ConnectionFailed(ILogger logger, long connectionId, string peer, Exception exception);

    [LoggerMessage(14, LogLevel.Debug, "[{ConnectionId}] {Peer}: soft disconnect ({Command})")]
    public static partial void SoftDisconnect(ILogger logger, long connectionId, string peer, string command);

    [LoggerMessage(15, LogLevel.Information, "Shutting down: {Connections} connections to finish")]
    public static partial void ShuttingDown(ILogger logger, int connections);

    [LoggerMessage(16, LogLevel.Warning, "Shutdown timed out with {Connections} connections still busy; closing them")]
    public static partial void ShutdownTimedOut(ILogger logger, int connections);

    [LoggerMessage(17, LogLevel.Error, "Flushing export '{Export}' at shutdown failed")]
    public static partial void ShutdownFlushFailed(ILogger logger, string export, Exception exception);

    [LoggerMessage(18, LogLevel.Debug, "[{ConnectionId}] {Peer}: option {Option} ({Length} bytes)")]
    public static partial void OptionReceived(ILogger logger, long connectionId, string peer, string option, uint length);

    [LoggerMessage(19, LogLevel.Debug, "[{ConnectionId}] {Peer}: disconnected by peer")]
    public static partial void PeerClosed(ILogger logger, long connectionId, string peer);

    [LoggerMessage(21, LogLevel.Information, "[{ConnectionId}] {Peer}: TLS started ({Protocol}, {Identity})")]
    public static partial void TlsStarted(ILogger logger, long connectionId, string peer, string protocol, string identity);

    [LoggerMessage(22, LogLevel.Warning, "[{ConnectionId}] {Peer}: TLS handshake failed, disconnecting: {Reason}")]
    public static partial void TlsFailed(ILogger logger, long connectionId, string peer, string reason);

    [LoggerMessage(23, LogLevel.Warning, "[{ConnectionId}] {Peer}: client certificate '{Subject}' refused: {Reason}")]
    public static partial void ClientCertificateRejected(ILogger logger, long connectionId, string peer, string subject, string reason);

    [LoggerMessage(24, LogLevel.Information, "[{ConnectionId}] {Peer}: idle for {Seconds} s, closing")]
    public static partial void IdleTimeout(ILogger logger, long connectionId, string peer, double seconds);

    [LoggerMessage(20, LogLevel.Warning, "[{ConnectionId}] {Peer}: closed with {Pending} requests still in flight after {Seconds} s")]
    public static partial void AbandonedRequests(ILogger logger, long connectionId, string peer, int pending, double seconds);
}
