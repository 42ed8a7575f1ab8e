using System.Numerics;
using Microsoft.Extensions.Logging;
using Spindle.Client;
using Spindle.Devices.Logging;
using Spindle.Devices.Native;

namespace Spindle.Devices.Nbd;

/// <summary>
/// /dev/nbdN attached through the kernel's nbd driver, and kept attached: the driver announces every connection it
/// loses (LINK_DEAD), and this replaces it with a new one, negotiated again (and checked to be the same export),
/// by NBD_CMD_RECONFIGURE. Meanwhile the driver holds new requests (up to the dead timeout) and sends the ones that
/// were in flight again when their timer fires, so I/O stalls through a server restart instead of failing.
/// </summary>
/// <remarks>
/// The driver announces a dead link but not which socket died, and RECONFIGURE quietly drops a socket when no slot
/// is dead. So this process keeps every socket it handed over and polls them: a socket the driver gave up on is
/// shut down (POLLHUP). After an adoption (a new daemon taking over a device another one attached) those are not
/// known; then sockets are handed one at a time until the driver takes one no more, which shows as its send
/// timeout: the driver sets SO_SNDTIMEO on each socket it takes (drivers/block/nbd.c, nbd_reconnect_socket).
/// </remarks>
public sealed partial class NbdKernelDevice : IAsyncDisposable
{
    private readonly NbdDriver _driver;
    private readonly INbdConnectionSource _source;
    private readonly NbdKernelOptions _options;
    private readonly ILogger _logger;
    private readonly List<NbdHandoffSocket> _sockets = [];
    private readonly SemaphoreSlim _wake = new(0);
    private int _linkDead;

    /// <summary>Sockets of an earlier process (after an adoption) known to be alive: a probe found no dead slot.</summary>
    private int _assumedAlive;
    private long _reconnections;

    private NbdKernelDevice(NbdDriver driver, INbdConnectionSource source, NbdKernelOptions options, ILogger logger, uint index, ExportInfo export, int connections)
    {
        _driver = driver;
        _source = source;
        _options = options;
        _logger = logger;
        Index = index;
        Export = export;
        Connections = connections;
    }

    public uint Index { get; }

    public string DevicePath => NbdDriver.DevicePath(Index);

    /// <summary>The export as the first connection negotiated it.</summary>
    public ExportInfo Export { get; }

    /// <summary>Sockets the kernel holds for this device.</summary>
    public int Connections { get; }

    /// <summary>Connections replaced since this process took the device.</summary>
    public long Reconnections => Interlocked.Read(ref _reconnections);

    public bool IsRelay => _source.IsRelay;

    /// <summary>
    /// Opens the connections, checks what the kernel needs, and asks the driver to start a device with them
    /// (NBD_CMD_CONNECT with size, block size, flags, timeouts and the backend identifier).
    /// </summary>
    public static async Task<NbdKernelDevice> AttachAsync(NbdDriver driver, INbdConnectionSource source, NbdKernelOptions options, ILogger logger, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(driver);
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(logger);
        var sockets = new List<NbdHandoffSocket>();
        try
        {
            sockets.Add(await source.OpenAsync(cancellationToken).ConfigureAwait(false));
            var export = sockets[0].Export;
            var blockSize = ChooseBlockSize(export, options);
            var wanted = source.IsRelay ? 1 : Math.Max(1, options.Connections);
            if (wanted > 1 && !export.CanMultiConn)
            {
                DevicesLog.NoMultiConn(logger, source.Description, wanted);
                wanted = 1;
            }

            while (sockets.Count < wanted)
            {
                var socket = await source.OpenAsync(cancellationToken).ConfigureAwait(false);
                sockets.Add(socket);
                CheckSameExport(export, socket.Export, source.Description);
            }

            var ioTimeout = options.EffectiveIoTimeout(source.IsRelay);
            var index = driver.Connect(new NbdConnectParameters
            {
                Index = options.Index,
                SizeBytes = (ulong)export.Size,
                BlockSize = blockSize,
                TimeoutSeconds = (ulong)Math.Max(1, Math.Ceiling(ioTimeout.TotalSeconds)),
                DeadConnectionTimeoutSeconds = options.DeadTimeoutSeconds,
                ServerFlags = (ulong)export.RawFlags,
                SocketDescriptors = [.. sockets.Select(socket => socket.Descriptor)],
                BackendIdentifier = options.BackendIdentifier,
            });
            var device = new NbdKernelDevice(driver, source, options, logger, index, export, sockets.Count);
            device._sockets.AddRange(sockets);
            DevicesLog.Attached(logger, device.DevicePath, source.IsRelay ? "relay" : "direct", source.Description, export.Size, blockSize, sockets.Count,
                ioTimeout.TotalSeconds, options.DeadTimeout == Timeout.InfiniteTimeSpan ? "never" : $"{options.DeadTimeout.TotalSeconds} s");
            return device;
        }
        catch
        {
            foreach (var socket in sockets)
            {
                socket.Disconnect();
            }

            throw;
        }
    }

    /// <summary>
    /// Takes over a device another process attached (it died or was restarted): the kernel kept the device and its
    /// connections; this checks the server still serves the same export and replaces whatever connections died
    /// meanwhile. <paramref name="connections"/> is how many sockets the device has.
    /// </summary>
    public static async Task<NbdKernelDevice> AdoptAsync(NbdDriver driver, INbdConnectionSource source, uint index, int connections, NbdKernelOptions options, ILogger logger,
        CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(driver);
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(options);
        if (!driver.IsConnected(index))
        {
            throw new InvalidOperationException($"{NbdDriver.DevicePath(index)} is not attached: nothing to adopt");
        }

        // The first connection is both the check of the export and, if a link is dead, its replacement.
        var probe = await OpenWithBackoffAsync(source, options, logger, null, cancellationToken).ConfigureAwait(false);
        var sizeBytes = ReadDeviceSize(index);
        if (sizeBytes is { } size && size != probe.Export.Size)
        {
            probe.Disconnect();
            throw new InvalidOperationException($"{NbdDriver.DevicePath(index)} has {size} bytes but {source.Description} serves {probe.Export.Size}: not the same export");
        }

        var device = new NbdKernelDevice(driver, source, options, logger, index, probe.Export, source.IsRelay ? 1 : Math.Max(1, connections));
        DevicesLog.Adopted(logger, device.DevicePath, source.IsRelay ? "relay" : "direct", source.Description, device.Connections);
        await device.RepairAsync(probe, cancellationToken).ConfigureAwait(false);
        return device;
    }

    /// <summary>
    /// Watches the device until <paramref name="cancellationToken"/> is cancelled or the device is disconnected by
    /// someone else (spindle detach without this process, nbd-client -d): replaces every connection the driver
    /// reports dead. Returns true when the device went away.
    /// </summary>
    public async Task<bool> WatchAsync(CancellationToken cancellationToken)
    {
        using var notifications = _driver.OpenNotifications();
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var listener = new Thread(() => Listen(notifications, stop.Token)) { IsBackground = true, Name = $"nbd{Index}-link-dead" };
        listener.Start();
        try
        {
            while (!cancellationToken.IsCancellationRequested)
            {
                try
                {
                    await _wake.WaitAsync(TimeSpan.FromSeconds(1), cancellationToken).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    break;
                }

                if (!_driver.IsConnected(Index))
                {
                    DevicesLog.Gone(_logger, DevicePath);
                    return true;
                }

                if (Interlocked.Exchange(ref _linkDead, 0) != 0)
                {
                    try
                    {
                        await RepairAsync(null, cancellationToken).ConfigureAwait(false);
                    }
                    catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
                    {
                        break;
                    }
                }
            }

            return false;
        }
        finally
        {
            await stop.CancelAsync().ConfigureAwait(false);
            notifications.Dispose();
            listener.Join(TimeSpan.FromSeconds(5));
        }
    }

    /// <summary>Whether something holds the device exclusively (a mounted file system, swap, a device mapper).</summary>
    public bool IsInUse() => DeviceUse.IsHeldExclusively(DevicePath);

    /// <summary>NBD_CMD_DISCONNECT: the driver sends NBD_CMD_DISC on every connection and lets the device go.</summary>
    public void Disconnect()
    {
        _driver.Disconnect(Index);
        DevicesLog.Disconnected(_logger, DevicePath);
    }

    /// <summary>Closes this process's handles of the sockets (the kernel's stay) and the data path.</summary>
    public async ValueTask DisposeAsync()
    {
        // Not Socket.Dispose on live sockets: .NET may reset a TCP connection it closes, and the kernel still uses
        // these. The process exiting closes the descriptors without touching the connections.
        lock (_sockets)
        {
            _sockets.RemoveAll(socket => IsDead(socket));
        }

        await _source.DisposeAsync().ConfigureAwait(false);
        _wake.Dispose();
    }

    private void Listen(NbdNotifications notifications, CancellationToken cancellationToken)
    {
        while (!cancellationToken.IsCancellationRequested)
        {
            IReadOnlyList<uint> dead;
            try
            {
                dead = notifications.WaitForLinkDead(500);
            }
            catch (Exception exception) when (exception is Netlink.NetlinkException or ObjectDisposedException)
            {
                return;
            }

            if (dead.Contains(Index))
            {
                DevicesLog.LinkDead(_logger, DevicePath);
                Interlocked.Exchange(ref _linkDead, 1);
                try
                {
                    _wake.Release();
                }
                catch (ObjectDisposedException)
                {
                    return;
                }
            }
        }
    }

    private static uint ChooseBlockSize(ExportInfo export, NbdKernelOptions options)
    {
        var size = options.BlockSize ?? Math.Max(512u, export.MinimumBlockSize);
        if (size is < 512 or > 4096 || !BitOperations.IsPow2(size))
        {
            throw new InvalidOperationException(options.BlockSize is null
                ? $"the export's minimum block size is {export.MinimumBlockSize} bytes; the kernel takes powers of two from 512 to 4096"
                : $"block size {size}: the kernel takes powers of two from 512 to 4096");
        }

        if (size < export.MinimumBlockSize)
        {
            throw new InvalidOperationException($"block size {size} is below the export's minimum of {export.MinimumBlockSize} bytes");
        }

        return size;
    }

    /// <summary>
    /// Only the same export may continue a device: same access, same UUID when the server gives one, and at least the
    /// size the device has. A larger one is the export grown on the server (an RBD image resized online): the device
    /// keeps the size it was attached with, so every request it sends still fits (detach and attach again to see the
    /// new size).
    /// </summary>
    private static void CheckSameExport(ExportInfo first, ExportInfo next, string server)
    {
        if (next.Size < first.Size || next.IsReadOnly != first.IsReadOnly
            || (first.Identity?.Uuid is { } uuid && next.Identity?.Uuid is { } other && !string.Equals(uuid, other, StringComparison.OrdinalIgnoreCase)))
        {
            throw new NbdConnectionException(
                $"{server} now serves another export ({next.Size} bytes{(next.IsReadOnly ? ", read-only" : string.Empty)}, uuid {next.Identity?.Uuid ?? "-"}) than the device has ({first.Size} bytes{(first.IsReadOnly ? ", read-only" : string.Empty)}, uuid {first.Identity?.Uuid ?? "-"})");
        }
    }

    private static long? ReadDeviceSize(uint index)
    {
        try
        {
            var sectors = long.Parse(File.ReadAllText($"/sys/block/nbd{index}/size").Trim(), System.Globalization.CultureInfo.InvariantCulture);
            return sectors * 512;
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException or FormatException)
        {
            return null;
        }
    }

    /// <summary>A socket the driver shut down (it gave up on the connection) or that the server closed.</summary>
    private static bool IsDead(NbdHandoffSocket socket)
    {
        var events = LibC.PollNow(socket.Descriptor, LibC.PollRdHup);
        return (events & (LibC.PollHup | LibC.PollErr | LibC.PollNval)) != 0;
    }
}
