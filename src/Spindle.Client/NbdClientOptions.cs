using Microsoft.Extensions.Logging;
using Spindle.Protocol;
using Spindle.Wire;

namespace Spindle.Client;

/// <summary>How a client negotiates and runs its connections. Each default is stated on its property.</summary>
public sealed class NbdClientOptions
{
    private List<string> _metaContexts = [Protocol.MetaContexts.BaseAllocation];

    /// <summary>Ask for structured replies (NBD_OPT_STRUCTURED_REPLY). Default: true; a server without them is used with simple replies.</summary>
    public bool StructuredReplies { get; set; } = true;

    /// <summary>
    /// Ask for extended headers first (NBD_OPT_EXTENDED_HEADERS: 64-bit lengths, so one TRIM, WRITE_ZEROES, CACHE or
    /// BLOCK_STATUS may cover a whole disk). Default: true; a server that refuses them gets structured replies
    /// instead. Ignored when <see cref="StructuredReplies"/> is false, as libnbd does.
    /// </summary>
    public bool ExtendedHeaders { get; set; } = true;

    /// <summary>
    /// Metadata contexts to select with NBD_OPT_SET_META_CONTEXT when structured replies are on. Default:
    /// <c>base:allocation</c>. Empty selects none (and BLOCK_STATUS is then unavailable).
    /// </summary>
    public IList<string> MetaContexts => _metaContexts;

    /// <summary>Also ask the server which metadata contexts it offers (NBD_OPT_LIST_META_CONTEXT), for tools that show them. Default: false.</summary>
    public bool ListMetaContexts { get; set; }

    /// <summary>
    /// Enter transmission with NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME if the server does not know GO).
    /// False goes straight to EXPORT_NAME, as a very old client would. Default: true.
    /// </summary>
    public bool UseGo { get; set; } = true;

    /// <summary>
    /// Connections to open to the export. More than one is used only if the server advertises
    /// NBD_FLAG_CAN_MULTI_CONN; otherwise the client keeps one, as the spec asks. Default: 1.
    /// </summary>
    public int Connections { get; set; } = 1;

    /// <summary>Requests in flight on one connection; more wait for a free slot. Default: 64 (libnbd's suggestion).</summary>
    public int MaxRequestsInFlight { get; set; } = 64;

    /// <summary>Time allowed to open the socket. Default: 30 seconds.</summary>
    public TimeSpan ConnectTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>Time allowed for the whole handshake after the socket is open. Default: 30 seconds.</summary>
    public TimeSpan HandshakeTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// A request with no reply after this long fails with <see cref="TimeoutException"/>, counted from when it was
    /// submitted, reconnections included (the connection stays up: the reply may still come and is then dropped).
    /// Default: <see cref="Timeout.InfiniteTimeSpan"/>, none.
    /// </summary>
    public TimeSpan RequestTimeout { get; set; } = Timeout.InfiniteTimeSpan;

    /// <summary>
    /// How long requests wait for a lost connection to come back. When a connection dies (the server restarted or
    /// shut down, a reset, <see cref="ReplyTimeout"/>), its unanswered requests and every new one wait while the
    /// client reconnects (with backoff, TLS included), then are sent again: NBD reads and writes are idempotent.
    /// Only when no connection to the export has worked for this long do waiting and new requests fail, with an
    /// <see cref="NbdConnectionException"/> naming the last error; the client keeps trying in the background, and
    /// requests work again once it is back. <see cref="TimeSpan.Zero"/> turns reconnection off (a lost connection
    /// fails its requests at once); <see cref="Timeout.InfiniteTimeSpan"/> waits forever. Default: 5 minutes.
    /// </summary>
    /// <remarks>Only the first connection is not retried: <see cref="NbdClient.ConnectAsync(string, NbdClientOptions?, CancellationToken)"/>
    /// fails at once when the server cannot be reached, so a wrong address is reported, not waited for.</remarks>
    public TimeSpan DeadConnectionTimeout { get; set; } = TimeSpan.FromMinutes(5);

    /// <summary>The wait before the second reconnection attempt (the first is immediate); it doubles after each failure. Default: 100 ms.</summary>
    public TimeSpan ReconnectDelay { get; set; } = TimeSpan.FromMilliseconds(100);

    /// <summary>The longest wait between reconnection attempts. Default: 2 seconds.</summary>
    public TimeSpan MaxReconnectDelay { get; set; } = TimeSpan.FromSeconds(2);

    /// <summary>
    /// A connection with requests in flight that receives nothing at all from the server for this long is taken for
    /// dead: it is closed (a reset) and its requests go out again on a new connection. This catches a server or
    /// network that hangs without closing; a machine that vanished is also caught by TCP keepalive. Default:
    /// 60 seconds; <see cref="Timeout.InfiniteTimeSpan"/> waits for the server indefinitely.
    /// </summary>
    public TimeSpan ReplyTimeout { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Learn the export's stable names (<see cref="ExportInfo.Identity"/>: UUID, label, serial) during negotiation:
    /// from a Spindle server's <c>x-spindle:</c> meta contexts (one round trip), otherwise from the aliases the server
    /// lists (a LIST and a few INFO round trips per connection). Always on for
    /// several paths, whose identities must agree. Default: false.
    /// </summary>
    public bool DiscoverIdentity { get; set; }

    /// <summary>TLS settings for <c>nbds://</c> URIs (the URI's own tls-* parameters take precedence).</summary>
    public NbdTlsOptions Tls { get; set; } = new();

    /// <summary>How long a graceful close waits for requests still in flight before hanging up. Default: 30 seconds.</summary>
    public TimeSpan DisconnectTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The largest READ or WRITE the client sends when the server advertises no maximum (or one above this).
    /// Default: 32 MiB, the size the spec says every server accepts.
    /// </summary>
    public int MaxPayload { get; set; } = NbdLimits.DefaultMaxPayload;

    /// <summary>Where the client logs negotiation and connection events. Default: none.</summary>
    public ILoggerFactory? LoggerFactory { get; set; }

    /// <summary>
    /// Opens the transport for a URI in place of a socket: the fuzz targets run a real client connection over bytes
    /// they script (an in-memory stream). Null, the default, connects the socket the URI names.
    /// </summary>
    internal Func<NbdUri, CancellationToken, Task<Transport>>? ConnectTransport { get; set; }

    /// <summary>True unless <see cref="DeadConnectionTimeout"/> is zero.</summary>
    internal bool Reconnects => DeadConnectionTimeout != TimeSpan.Zero;

    /// <summary>A copy, so a client keeps the settings it was made with.</summary>
    internal NbdClientOptions Clone()
    {
        var copy = (NbdClientOptions)MemberwiseClone();
        copy._metaContexts = [.. MetaContexts];
        return copy;
    }

    internal void Validate()
    {
        if (Connections < 1 || Connections > 64)
        {
            throw new ArgumentOutOfRangeException(nameof(Connections), Connections, "connections must be between 1 and 64");
        }

        if (MaxRequestsInFlight < 1 || MaxRequestsInFlight > 4096)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxRequestsInFlight), MaxRequestsInFlight, "requests in flight must be between 1 and 4096");
        }

        if (MaxPayload < 512 || MaxPayload > 64 * 1024 * 1024)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxPayload), MaxPayload, "the maximum payload must be between 512 bytes and 64 MiB");
        }

        foreach (var (name, value) in new[] { (nameof(DeadConnectionTimeout), DeadConnectionTimeout), (nameof(ReplyTimeout), ReplyTimeout), (nameof(RequestTimeout), RequestTimeout) })
        {
            if (value < TimeSpan.Zero && value != Timeout.InfiniteTimeSpan)
            {
                throw new ArgumentOutOfRangeException(name, value, "a timeout must be zero or more, or infinite");
            }
        }

        if (ReconnectDelay <= TimeSpan.Zero || MaxReconnectDelay < ReconnectDelay)
        {
            throw new ArgumentOutOfRangeException(nameof(ReconnectDelay), ReconnectDelay, "the reconnect delay must be positive and at most MaxReconnectDelay");
        }

        ArgumentNullException.ThrowIfNull(Tls, nameof(Tls));
        foreach (var context in MetaContexts)
        {
            NbdString.Validate(context, nameof(MetaContexts));
        }
    }
}
