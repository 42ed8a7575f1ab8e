using Microsoft.Extensions.Logging;
using Spindle.Protocol;

namespace Spindle.Client;

/// <summary>Every client log message, with a stable event id and the server it concerns.</summary>
internal static partial class ClientLog
{
    [LoggerMessage(101, LogLevel.Debug, "{Server}: greeting, handshake flags {Flags}")]
    public static partial void Greeting(ILogger logger, string server, HandshakeFlags flags);

    [LoggerMessage(102, LogLevel.Trace, "{Server}: sent {Option} ({Length} bytes of data)")]
    public static partial void OptionSent(ILogger logger, string server, string option, int length);

    [LoggerMessage(103, LogLevel.Debug, "{Server}: {Option} refused with {Reply}: {Message}")]
    public static partial void OptionRefused(ILogger logger, string server, string option, OptionReplyType reply, string message);

    [LoggerMessage(104, LogLevel.Information, "[{Connection}] {Server}: export '{Export}' ({Size} bytes, flags {Flags}) via {Method}, structured replies {Structured}, extended headers {Extended}, contexts {Contexts}")]
    public static partial void Negotiated(ILogger logger, int connection, string server, string export, long size, TransmissionFlags flags, NegotiationMethod method, bool structured, bool extended, string contexts);

    [LoggerMessage(105, LogLevel.Warning, "[{Connection}] {Server}: connection failed with {Pending} requests in flight: {Reason}")]
    public static partial void ConnectionFailed(ILogger logger, int connection, string server, int pending, string reason);

    [LoggerMessage(106, LogLevel.Debug, "[{Connection}] {Server}: disconnected")]
    public static partial void Disconnected(ILogger logger, int connection, string server);

    [LoggerMessage(107, LogLevel.Information, "{Server}: the export does not advertise multi-conn; using 1 connection instead of {Requested}")]
    public static partial void NoMultiConn(ILogger logger, string server, int requested);

    [LoggerMessage(108, LogLevel.Debug, "{Server}: NBD_OPT_GO unknown to the server, falling back to NBD_OPT_EXPORT_NAME")]
    public static partial void FallingBackToExportName(ILogger logger, string server);

    [LoggerMessage(109, LogLevel.Warning, "[{Connection}] {Server}: request timed out after {Seconds} s: {Request}")]
    public static partial void RequestTimedOut(ILogger logger, int connection, string server, double seconds, string request);

    [LoggerMessage(110, LogLevel.Debug, "{Server}: NBD_OPT_INFO reported size 0 for '{Export}'; confirming with NBD_OPT_GO (nbd-server 3.24 reports 0 until the export is opened)")]
    public static partial void ConfirmingZeroSize(ILogger logger, string server, string export);

    [LoggerMessage(111, LogLevel.Debug, "{Server}: TLS up ({Protocol}); {Settings}")]
    public static partial void TlsStarted(ILogger logger, string server, string protocol, string settings);

    [LoggerMessage(112, LogLevel.Warning, "[{Connection}] {Server}: connection lost with {Pending} requests in flight, reconnecting (they will be sent again): {Reason}")]
    public static partial void ConnectionLost(ILogger logger, int connection, string server, int pending, string reason);

    [LoggerMessage(113, LogLevel.Warning, "[{Connection}] {Server}: reconnected after {Seconds:0.###} s ({Attempts} attempts)")]
    public static partial void Reconnected(ILogger logger, int connection, string server, double seconds, int attempts);

    [LoggerMessage(114, LogLevel.Warning, "{Server}: reconnecting failed, retrying: {Reason}")]
    public static partial void ReconnectFailed(ILogger logger, string server, string reason);

    [LoggerMessage(115, LogLevel.Error, "{Reason}; {Waiting} waiting requests failed, new ones fail until a connection is back")]
    public static partial void ConnectionDead(ILogger logger, string reason, int waiting);

    [LoggerMessage(116, LogLevel.Warning, "{Server}: path not connected, retrying in the background: {Reason}")]
    public static partial void PathDown(ILogger logger, string server, string reason);

    [LoggerMessage(117, LogLevel.Error, "[{Connection}] {Server}: the connection's loops did not stop within 30 s of its failure; its requests are sent again anyway")]
    public static partial void LoopsDidNotStop(ILogger logger, int connection, string server);

    [LoggerMessage(118, LogLevel.Information, "{Server}: the export grew from {OldSize} to {NewSize} bytes (every connection came back with the larger size)")]
    public static partial void ExportGrew(ILogger logger, string server, long oldSize, long newSize);
}
