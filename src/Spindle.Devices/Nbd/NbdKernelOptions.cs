namespace Spindle.Devices.Nbd;

/// <summary>How a kernel NBD device is set up and kept alive. Each default is explained on its property.</summary>
public sealed record NbdKernelOptions
{
    /// <summary>Direct mode's default request timeout: see <see cref="IoTimeout"/>.</summary>
    public static readonly TimeSpan DefaultDirectIoTimeout = TimeSpan.FromSeconds(10);

    /// <summary>The device to use, /dev/nbd<c>Index</c>; null takes the first unused one. Default: null.</summary>
    public uint? Index { get; init; }

    /// <summary>
    /// Sockets the kernel holds (one blk-mq hardware queue each); more than one only when the export advertises
    /// CAN_MULTI_CONN (the driver refuses otherwise). The relay always uses one. Default: 1.
    /// </summary>
    public int Connections { get; init; } = 1;

    /// <summary>
    /// The kernel's request timeout (NBD_ATTR_TIMEOUT). A request in flight on a connection that dies is sent again
    /// only when this timer fires (Linux re-queues it then, onto the replacement socket): it bounds the stall a
    /// server restart causes, and a request the server takes longer than this to answer costs a reconnection (the
    /// kernel takes the connection for dead). Null chooses per data path: 10 s direct (a restart then stalls I/O
    /// for at most about 10 s); the relay never loses its socket to a server restart, so it gets the dead timeout
    /// plus a minute (requests fail by the client's dead timeout first) or a day for a hard mount.
    /// </summary>
    public TimeSpan? IoTimeout { get; init; }

    /// <summary>
    /// How long I/O waits for a lost connection to come back before it fails with EIO (NBD_ATTR_DEAD_CONN_TIMEOUT
    /// in direct mode; the client's dead timeout in the relay). <see cref="Timeout.InfiniteTimeSpan"/> never fails.
    /// Reconnection goes on in the background either way, and the device works again once the server is back.
    /// Default: 5 minutes, as for FUSE devices.
    /// </summary>
    public TimeSpan DeadTimeout { get; init; } = TimeSpan.FromMinutes(5);

    /// <summary>
    /// The logical block size; null: the export's minimum block size, at least 512. Must be a power of two from 512
    /// to 4096.
    /// </summary>
    public uint? BlockSize { get; init; }

    /// <summary>Shown in /sys/block/nbdN/backend and repeated on every RECONFIGURE. Default: none.</summary>
    public string? BackendIdentifier { get; init; }

    /// <summary>The wait before the second reconnection attempt (the first is immediate); doubles after each failure. Default: 100 ms.</summary>
    public TimeSpan ReconnectDelay { get; init; } = TimeSpan.FromMilliseconds(100);

    /// <summary>The longest wait between reconnection attempts. Default: 2 s.</summary>
    public TimeSpan MaxReconnectDelay { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>The request timeout for a data path, <see cref="IoTimeout"/> when set.</summary>
    public TimeSpan EffectiveIoTimeout(bool relay) => IoTimeout ?? (relay
        ? DeadTimeout == Timeout.InfiniteTimeSpan ? TimeSpan.FromDays(1) : DeadTimeout + TimeSpan.FromMinutes(1)
        : DefaultDirectIoTimeout);

    /// <summary>The dead timeout in whole seconds as the driver takes it; "never" is a century.</summary>
    internal ulong DeadTimeoutSeconds => DeadTimeout == Timeout.InfiniteTimeSpan ? 100UL * 365 * 24 * 3600 : (ulong)Math.Ceiling(DeadTimeout.TotalSeconds);
}
