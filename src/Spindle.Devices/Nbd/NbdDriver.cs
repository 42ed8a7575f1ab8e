using System.Globalization;
using Spindle.Devices.Netlink;

namespace Spindle.Devices.Nbd;

/// <summary>
/// The Linux nbd driver through its generic netlink family: CONNECT, RECONFIGURE, DISCONNECT and STATUS, each a
/// request answered within the system call (the sockets named in CONNECT and RECONFIGURE are looked up in this
/// process), and LINK_DEAD notifications on a socket of their own (<see cref="OpenNotifications"/>).
/// </summary>
public sealed class NbdDriver : IDisposable
{
    private readonly NetlinkSocket _socket;
    private readonly Lock _lock = new();

    private NbdDriver(NetlinkSocket socket, ushort family, uint? multicastGroup)
    {
        _socket = socket;
        FamilyId = family;
        MulticastGroup = multicastGroup;
    }

    public ushort FamilyId { get; }

    public uint? MulticastGroup { get; }

    /// <summary>
    /// Opens the family; null (with the reason) when this kernel has no nbd driver: the family is unknown even after
    /// the controller's attempt to load the module. Other failures throw.
    /// </summary>
    public static NbdDriver? TryOpen(out string? reason)
    {
        reason = null;
        var socket = NetlinkSocket.Open();
        try
        {
            var groups = new Dictionary<string, uint>(StringComparer.Ordinal);
            ushort family = 0;
            try
            {
                foreach (var answer in socket.Request(GenericNetlinkControl.GetFamily(socket.NextSequence(), NbdNetlinkMessages.FamilyName), "CTRL_CMD_GETFAMILY nbd"))
                {
                    if (GenericNetlinkControl.TryReadFamily(answer, out var id, groups))
                    {
                        family = id;
                    }
                }
            }
            catch (NetlinkException exception) when (exception.Errno == 2)
            {
                // ENOENT: no such family; the module is not loaded and could not be (modprobe nbd).
                reason = "this kernel has no nbd driver (the generic netlink family 'nbd' is unknown; modprobe nbd?)";
                socket.Dispose();
                return null;
            }

            if (family == 0)
            {
                throw new NetlinkException("CTRL_CMD_GETFAMILY nbd: no family id in the answer");
            }

            return new NbdDriver(socket, family, groups.TryGetValue(NbdNetlinkMessages.MulticastGroupName, out var group) ? group : null);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>Whether the nbd driver is there (and its family can be opened by this process).</summary>
    public static bool IsAvailable(out string? reason)
    {
        try
        {
            using var driver = TryOpen(out reason);
            return driver is not null;
        }
        catch (NetlinkException exception)
        {
            reason = exception.Message;
            return false;
        }
    }

    /// <summary>NBD_CMD_CONNECT: returns the index of the device the driver started (/dev/nbdN).</summary>
    internal uint Connect(NbdConnectParameters parameters)
    {
        lock (_lock)
        {
            var answers = _socket.Request(NbdNetlinkMessages.Connect(FamilyId, _socket.NextSequence(), parameters), "NBD_CMD_CONNECT");
            foreach (var answer in answers)
            {
                if (NbdNetlinkMessages.TryReadIndex(answer, NbdNetlinkMessages.CommandConnect, out var index))
                {
                    return index;
                }
            }

            // An older driver without the answer: the index asked for is the one it used.
            return parameters.Index ?? throw new NetlinkException("NBD_CMD_CONNECT: the driver did not say which device it used");
        }
    }

    /// <summary>NBD_CMD_RECONFIGURE with replacement sockets (each goes into a slot whose socket is dead, if any).</summary>
    public void Reconfigure(uint index, IReadOnlyList<int> sockets, string? backendIdentifier)
    {
        lock (_lock)
        {
            _socket.Request(NbdNetlinkMessages.Reconfigure(FamilyId, _socket.NextSequence(), index, sockets, backendIdentifier), "NBD_CMD_RECONFIGURE");
        }
    }

    /// <summary>NBD_CMD_DISCONNECT: the driver sends NBD_CMD_DISC to the server and lets the device go.</summary>
    public void Disconnect(uint index)
    {
        lock (_lock)
        {
            _socket.Request(NbdNetlinkMessages.Disconnect(FamilyId, _socket.NextSequence(), index), "NBD_CMD_DISCONNECT");
        }
    }

    /// <summary>NBD_CMD_STATUS: the devices the driver has (one when <paramref name="index"/> is given) and whether each is connected.</summary>
    public IReadOnlyList<NbdDeviceStatus> Status(uint? index)
    {
        lock (_lock)
        {
            var devices = new List<NbdDeviceStatus>();
            foreach (var answer in _socket.Request(NbdNetlinkMessages.Status(FamilyId, _socket.NextSequence(), index), "NBD_CMD_STATUS"))
            {
                if (!NbdNetlinkMessages.TryReadStatus(answer, devices))
                {
                    throw new NetlinkException("NBD_CMD_STATUS: a malformed answer from the driver");
                }
            }

            return devices;
        }
    }

    /// <summary>Whether /dev/nbd<paramref name="index"/> has a configuration (is attached to a server).</summary>
    public bool IsConnected(uint index) => Status(index).Any(device => device.Index == index && device.Connected);

    /// <summary>A socket subscribed to the driver's multicast group: LINK_DEAD notifications arrive on it.</summary>
    public NbdNotifications OpenNotifications()
    {
        if (MulticastGroup is not { } group)
        {
            throw new NetlinkException("the nbd driver has no multicast group (LINK_DEAD notifications)");
        }

        var socket = NetlinkSocket.Open();
        try
        {
            socket.Subscribe(group);
            return new NbdNotifications(socket, FamilyId);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    public void Dispose() => _socket.Dispose();

    /// <summary>/dev/nbdN for an index.</summary>
    public static string DevicePath(uint index) => "/dev/nbd" + index.ToString(CultureInfo.InvariantCulture);

    /// <summary>The index of /dev/nbdN (or nbdN), or null when <paramref name="device"/> names no nbd device.</summary>
    public static uint? ParseDevice(string device)
    {
        ArgumentNullException.ThrowIfNull(device);
        var name = device.StartsWith("/dev/", StringComparison.Ordinal) ? device[5..] : device;
        return name.StartsWith("nbd", StringComparison.Ordinal)
            && uint.TryParse(name.AsSpan(3), NumberStyles.None, CultureInfo.InvariantCulture, out var index)
            ? index
            : null;
    }

    /// <summary>What /sys/block/nbdN/backend says (the backend identifier given at connect), or null.</summary>
    public static string? ReadBackend(uint index)
    {
        try
        {
            var text = File.ReadAllText($"/sys/block/nbd{index}/backend").TrimEnd('\n');
            return text.Length == 0 ? null : text;
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }
}

/// <summary>LINK_DEAD notifications of the nbd driver (a socket subscribed to its multicast group).</summary>
public sealed class NbdNotifications : IDisposable
{
    private readonly NetlinkSocket _socket;
    private readonly ushort _family;

    internal NbdNotifications(NetlinkSocket socket, ushort family)
    {
        _socket = socket;
        _family = family;
    }

    /// <summary>
    /// Waits up to <paramref name="timeoutMilliseconds"/> for notifications and returns the device indices of the
    /// LINK_DEAD ones; null when the socket overflowed and notifications may have been lost.
    /// </summary>
    public IReadOnlyList<uint> WaitForLinkDead(int timeoutMilliseconds)
    {
        var dead = new List<uint>();
        foreach (var (type, payload) in _socket.ReceiveNotifications(timeoutMilliseconds))
        {
            if (type == _family && NbdNetlinkMessages.TryReadIndex(payload, NbdNetlinkMessages.CommandLinkDead, out var index))
            {
                dead.Add(index);
            }
        }

        return dead;
    }

    public void Dispose() => _socket.Dispose();
}
