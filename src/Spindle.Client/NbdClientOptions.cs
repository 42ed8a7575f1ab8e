using Microsoft.Extensions.Logging;
using Spindle.Protocol;

namespace Spindle.Client;

/// <summary>How a client negotiates and runs its connections. Each default is stated on its property.</summary>
public sealed class NbdClientOptions
{
    /// <summary>Ask for structured replies (NBD_OPT_STRUCTURED_REPLY). Default: true; a server without them is used with simple replies.</summary>
    public bool StructuredReplies { get; set; } = true;

    /// <summary>
    /// Metadata contexts to select with NBD_OPT_SET_META_CONTEXT when structured replies are on. Default:
    /// <c>base:allocation</c>. Empty selects none (and BLOCK_STATUS is then unavailable).
    /// </summary>
    public IList<string> MetaContexts { get; } = [Protocol.MetaContexts.BaseAllocation];

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
    /// A request with no reply after this long fails with <see cref="TimeoutException"/> (the connection stays up: the
    /// reply may still come and is then dropped). Default: <see cref="Timeout.InfiniteTimeSpan"/>, none.
    /// </summary>
    public TimeSpan RequestTimeout { get; set; } = Timeout.InfiniteTimeSpan;

    /// <summary>How long a graceful close waits for requests still in flight before hanging up. Default: 30 seconds.</summary>
    public TimeSpan DisconnectTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The largest READ or WRITE the client sends when the server advertises no maximum (or one above this).
    /// Default: 32 MiB, the size the spec says every server accepts.
    /// </summary>
    public int MaxPayload { get; set; } = NbdLimits.DefaultMaxPayload;

    /// <summary>Where the client logs negotiation and connection events. Default: none.</summary>
    public ILoggerFactory? LoggerFactory { get; set; }

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

        foreach (var context in MetaContexts)
        {
            NbdString.Validate(context, nameof(MetaContexts));
        }
    }
}
