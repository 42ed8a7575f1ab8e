namespace Spindle.Server.Diagnostics;

/// <summary>One open connection as an operator sees it (status page, control socket): a snapshot, not live.</summary>
/// <param name="Id">The connection's number in this server's logs.</param>
/// <param name="Peer">The client's address, or "unix".</param>
/// <param name="Transport">"tcp", "unix" or "other".</param>
/// <param name="Tls">Whether STARTTLS succeeded.</param>
/// <param name="TlsIdentity">The client certificate's common name (or subject), if it sent one.</param>
/// <param name="Export">The export in use, null while still negotiating.</param>
/// <param name="ConnectedAt">When the connection was accepted.</param>
/// <param name="Counters">Requests answered on it so far (live: read it once).</param>
/// <param name="RequestsInFlight">Requests received and not yet answered.</param>
/// <param name="BytesInFlight">Payload bytes held for it.</param>
/// <param name="Draining">Whether it is being drained (export removed, or an operator disconnected it).</param>
public sealed record ConnectionInfo(
    long Id,
    string Peer,
    string Transport,
    bool Tls,
    string? TlsIdentity,
    string? Export,
    DateTimeOffset ConnectedAt,
    CommandCounters Counters,
    int RequestsInFlight,
    long BytesInFlight,
    bool Draining);
