using System.Net;
using Spindle.Protocol;
using Spindle.Server.Security;

namespace Spindle.Server;

/// <summary>An address a server listens on: a TCP endpoint or a Unix socket path.</summary>
public abstract record ListenEndpoint
{
    public sealed record Tcp(IPAddress Address, int Port) : ListenEndpoint
    {
        public override string ToString() => new IPEndPoint(Address, Port).ToString();
    }

    public sealed record Unix(string Path) : ListenEndpoint
    {
        public override string ToString() => "unix:" + Path;
    }

    /// <summary>
    /// A socket already bound and listening, handed over by whoever started the server (systemd's socket activation:
    /// <c>LISTEN_FDS</c>). It is served as if bound here, and left in place when the server stops (its owner made it).
    /// </summary>
    public sealed record Inherited(System.Net.Sockets.Socket Socket, string Name) : ListenEndpoint
    {
        public override string ToString() => $"inherited socket '{Name}' ({Socket.LocalEndPoint})";
    }

    /// <summary>
    /// Every interface, IPv6 and IPv4 (a dual-stack socket on [::]), the way nbd-server and qemu-nbd listen by default.
    /// </summary>
    public static ListenEndpoint AnyAddress(int port = NbdLimits.DefaultPort) => new Tcp(IPAddress.IPv6Any, port);
}

/// <summary>A session name given to the clients that an address rule matches.</summary>
public sealed record SessionName(string Name, ExportAccess Clients);

/// <summary>Server-wide settings. Each default is stated on its property.</summary>
public sealed class ServerOptions
{
    /// <summary>Where to listen. Default: [::]:10809 (all interfaces, IPv6 and IPv4).</summary>
    public IList<ListenEndpoint> Endpoints { get; } = [];

    /// <summary>A client that has not finished negotiating by then is disconnected. Default: 10 seconds.</summary>
    public TimeSpan HandshakeTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// How long a stop waits for in-flight requests to finish and data to be flushed before it cuts connections.
    /// Default: 10 seconds.
    /// </summary>
    public TimeSpan ShutdownTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>Whether NBD_OPT_LIST names the exports. Default: true (nbd-server's default is false).</summary>
    public bool AllowList { get; set; } = true;

    /// <summary>
    /// Requests one connection may have in flight; once reached the server stops reading until replies go out.
    /// Default: 256 (the kernel client queues up to 128 per connection).
    /// </summary>
    public int MaxRequestsInFlight { get; set; } = 256;

    /// <summary>
    /// Payload bytes (write data received, read data not yet sent) one connection may hold. A single request larger
    /// than this is still served, alone. Default: 32 MiB.
    /// </summary>
    public long MaxBytesInFlight { get; set; } = 32L * 1024 * 1024;

    /// <summary>
    /// Payload bytes all connections together may hold, so many clients cannot add up to more memory than this.
    /// Default: 1 GiB.
    /// </summary>
    public long MaxBytesInFlightTotal { get; set; } = 1L << 30;

    /// <summary>
    /// A connection in transmission with nothing in flight and no request for this long is closed. Default: null
    /// (never: an idle mounted disk is normal).
    /// </summary>
    public TimeSpan? IdleTimeout { get; set; }

    /// <summary>
    /// The largest READ or WRITE accepted. Default and minimum: 32 MiB, the size the spec says no server should refuse.
    /// </summary>
    public int MaxPayload { get; set; } = NbdLimits.DefaultMaxPayload;

    /// <summary>
    /// A refused WRITE's payload is read and discarded, to keep the stream in step, up to this many bytes; a bigger
    /// one is treated as an attack and the connection is closed. Default: 128 MiB.
    /// </summary>
    public long MaxDiscardedPayload { get; set; } = 128L * 1024 * 1024;

    /// <summary>Options one client may send before it is considered abusive and cut off. Default: 1024.</summary>
    public int MaxOptionsPerConnection { get; set; } = 1024;

    /// <summary>The largest option data buffered; bigger known options get NBD_REP_ERR_TOO_BIG. Default: 64 KiB.</summary>
    public int MaxOptionDataLength { get; set; } = 64 * 1024;

    /// <summary>The most extents one BLOCK_STATUS reply describes (the client asks again for the rest). Default: 65536.</summary>
    public int MaxExtentsPerReply { get; set; } = 65536;

    /// <summary>
    /// Serve sockets with blocking system calls on a thread per connection (default: true). Each message then costs
    /// one wake-up instead of an epoll event and a thread-pool hop, which is what low latency needs; false uses .NET's
    /// asynchronous sockets (fewer threads for very many idle connections).
    /// </summary>
    public bool BlockingSockets { get; set; } = true;

    /// <summary>
    /// Session names for clients without a TLS identity, by address (the first match wins): what
    /// <c>%SESSNAME%</c> in a directory export becomes. A TLS client's session name is its certificate's common name.
    /// </summary>
    public IList<SessionName> SessionNames { get; } = [];

    /// <summary>TLS settings; null (the default) serves without TLS (NOTLS mode).</summary>
    public TlsOptions? Tls { get; set; }

    /// <summary>Simultaneous connections across all exports; more are refused at once. Default: 1024.</summary>
    public int MaxConnections { get; set; } = 1024;

    internal void Validate()
    {
        if (MaxPayload < NbdLimits.DefaultMaxPayload)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxPayload), MaxPayload, "the maximum payload must be at least 32 MiB");
        }

        if (MaxRequestsInFlight < 1 || MaxBytesInFlight < 1 || MaxBytesInFlightTotal < 1 || MaxOptionsPerConnection < 1 || MaxExtentsPerReply < 1 || MaxConnections < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(ServerOptions), "limits must be positive");
        }

        if (HandshakeTimeout <= TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(HandshakeTimeout), "the handshake timeout must be positive");
        }
    }
}
