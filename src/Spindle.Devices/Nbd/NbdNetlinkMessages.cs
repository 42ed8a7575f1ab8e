using Spindle.Devices.Netlink;

namespace Spindle.Devices.Nbd;

/// <summary>
/// The nbd driver's generic netlink family "nbd", version 1 (include/uapi/linux/nbd-netlink.h;
/// ../shared/nbd-protocol.md section 13): the requests Spindle sends and the answers it reads. Every request goes
/// with NLM_F_ACK so a refusal comes back as an NLMSG_ERROR with the errno the driver returned.
/// </summary>
internal static class NbdNetlinkMessages
{
    public const string FamilyName = "nbd";
    public const string MulticastGroupName = "nbd_mc_group";
    public const byte Version = 1;

    // Commands (enum nbd_genl_command).
    public const byte CommandConnect = 1;
    public const byte CommandDisconnect = 2;
    public const byte CommandReconfigure = 3;
    public const byte CommandLinkDead = 4;
    public const byte CommandStatus = 5;

    // Attributes (NBD_ATTR_*).
    public const ushort AttrIndex = 1;
    public const ushort AttrSizeBytes = 2;
    public const ushort AttrBlockSizeBytes = 3;
    public const ushort AttrTimeout = 4;
    public const ushort AttrServerFlags = 5;
    public const ushort AttrClientFlags = 6;
    public const ushort AttrSockets = 7;
    public const ushort AttrDeadConnTimeout = 8;
    public const ushort AttrDeviceList = 9;
    public const ushort AttrBackendIdentifier = 10;

    // Inside NBD_ATTR_SOCKETS: NBD_SOCK_ITEM { NBD_SOCK_FD u32 }.
    public const ushort SockItem = 1;
    public const ushort SockFd = 1;

    // Inside NBD_ATTR_DEVICE_LIST: NBD_DEVICE_ITEM { NBD_DEVICE_INDEX u32, NBD_DEVICE_CONNECTED u8 }.
    public const ushort DeviceItem = 1;
    public const ushort DeviceIndex = 1;
    public const ushort DeviceConnected = 2;

    /// <summary>NBD_CFLAG_DESTROY_ON_DISCONNECT: the device node goes away with the connection.</summary>
    public const ulong ClientFlagDestroyOnDisconnect = 1;

    /// <summary>NBD_CFLAG_DISCONNECT_ON_CLOSE: disconnect when the last opener closes the device.</summary>
    public const ulong ClientFlagDisconnectOnClose = 2;

    private const ushort RequestFlags = NetlinkHeader.FlagRequest | NetlinkHeader.FlagAck;

    /// <summary>NBD_CMD_CONNECT: everything the driver needs to start /dev/nbdN (SIZE_BYTES and SOCKETS are mandatory).</summary>
    public static byte[] Connect(ushort family, uint sequence, NbdConnectParameters parameters)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        if (parameters.SocketDescriptors.Count == 0)
        {
            throw new ArgumentException("NBD_CMD_CONNECT needs at least one socket", nameof(parameters));
        }

        var builder = new NetlinkRequestBuilder(family, RequestFlags, sequence, CommandConnect, Version);
        if (parameters.Index is { } index)
        {
            builder.U32(AttrIndex, index);
        }

        builder.U64(AttrSizeBytes, parameters.SizeBytes)
            .U64(AttrBlockSizeBytes, parameters.BlockSize)
            .U64(AttrTimeout, parameters.TimeoutSeconds)
            .U64(AttrDeadConnTimeout, parameters.DeadConnectionTimeoutSeconds)
            .U64(AttrServerFlags, parameters.ServerFlags)
            .U64(AttrClientFlags, parameters.ClientFlags);
        AddSockets(builder, parameters.SocketDescriptors);
        if (parameters.BackendIdentifier is { } backend)
        {
            builder.String(AttrBackendIdentifier, backend);
        }

        return builder.ToArray();
    }

    /// <summary>
    /// NBD_CMD_RECONFIGURE with new sockets: the driver puts each into a slot whose socket it has marked dead and
    /// silently drops the rest. A device with a backend identifier wants the same one repeated.
    /// </summary>
    public static byte[] Reconfigure(ushort family, uint sequence, uint index, IReadOnlyList<int> sockets, string? backendIdentifier)
    {
        ArgumentNullException.ThrowIfNull(sockets);
        var builder = new NetlinkRequestBuilder(family, RequestFlags, sequence, CommandReconfigure, Version).U32(AttrIndex, index);
        if (backendIdentifier is not null)
        {
            builder.String(AttrBackendIdentifier, backendIdentifier);
        }

        if (sockets.Count > 0)
        {
            AddSockets(builder, sockets);
        }

        return builder.ToArray();
    }

    /// <summary>NBD_CMD_DISCONNECT: the driver sends NBD_CMD_DISC on every socket, shuts them down and fails what is queued.</summary>
    public static byte[] Disconnect(ushort family, uint sequence, uint index) =>
        new NetlinkRequestBuilder(family, RequestFlags, sequence, CommandDisconnect, Version).U32(AttrIndex, index).ToArray();

    /// <summary>NBD_CMD_STATUS for one device, or every device when <paramref name="index"/> is null.</summary>
    public static byte[] Status(ushort family, uint sequence, uint? index)
    {
        var builder = new NetlinkRequestBuilder(family, RequestFlags, sequence, CommandStatus, Version);
        if (index is { } value)
        {
            builder.U32(AttrIndex, value);
        }

        return builder.ToArray();
    }

    /// <summary>
    /// The device index in a CONNECT answer or a LINK_DEAD notification (both carry NBD_ATTR_INDEX alone).
    /// </summary>
    public static bool TryReadIndex(ReadOnlySpan<byte> genericPayload, byte expectedCommand, out uint index)
    {
        index = 0;
        if (!GenericHeader.TryRead(genericPayload, out var header) || header.Command != expectedCommand)
        {
            return false;
        }

        var found = false;
        var reader = new NetlinkAttributeReader(genericPayload[GenericHeader.Size..]);
        while (reader.TryNext(out var type, out var value))
        {
            if (type == AttrIndex)
            {
                found = NetlinkAttributeReader.TryReadU32(value, out index);
            }
        }

        return found && !reader.IsMalformed;
    }

    /// <summary>The devices a STATUS answer lists: NBD_ATTR_DEVICE_LIST { NBD_DEVICE_ITEM { INDEX, CONNECTED } ... }.</summary>
    public static bool TryReadStatus(ReadOnlySpan<byte> genericPayload, List<NbdDeviceStatus> devices)
    {
        ArgumentNullException.ThrowIfNull(devices);
        if (!GenericHeader.TryRead(genericPayload, out var header) || header.Command != CommandStatus)
        {
            return false;
        }

        var reader = new NetlinkAttributeReader(genericPayload[GenericHeader.Size..]);
        while (reader.TryNext(out var type, out var list))
        {
            if (type != AttrDeviceList)
            {
                continue;
            }

            var items = new NetlinkAttributeReader(list);
            while (items.TryNext(out var itemType, out var item))
            {
                if (itemType != DeviceItem)
                {
                    continue;
                }

                uint? index = null;
                var connected = false;
                var fields = new NetlinkAttributeReader(item);
                while (fields.TryNext(out var field, out var value))
                {
                    if (field == DeviceIndex && NetlinkAttributeReader.TryReadU32(value, out var number))
                    {
                        index = number;
                    }
                    else if (field == DeviceConnected && NetlinkAttributeReader.TryReadU8(value, out var flag))
                    {
                        connected = flag != 0;
                    }
                }

                if (fields.IsMalformed || index is null)
                {
                    return false;
                }

                devices.Add(new NbdDeviceStatus(index.Value, connected));
            }

            if (items.IsMalformed)
            {
                return false;
            }
        }

        return !reader.IsMalformed;
    }

    private static void AddSockets(NetlinkRequestBuilder builder, IReadOnlyList<int> sockets)
    {
        var list = builder.BeginNested(AttrSockets);
        foreach (var socket in sockets)
        {
            var item = builder.BeginNested(SockItem);
            builder.U32(SockFd, checked((uint)socket));
            builder.EndNested(item);
        }

        builder.EndNested(list);
    }
}

/// <summary>What NBD_CMD_CONNECT tells the driver.</summary>
internal sealed record NbdConnectParameters
{
    /// <summary>The device to use (/dev/nbdN); null lets the driver pick an unused one (or create one).</summary>
    public uint? Index { get; init; }

    public required ulong SizeBytes { get; init; }

    /// <summary>The logical (and physical) block size: a power of two from 512 to the page size.</summary>
    public required ulong BlockSize { get; init; }

    /// <summary>The request timeout in seconds (0: the block layer's 30 s, and a lone connection never gives up).</summary>
    public required ulong TimeoutSeconds { get; init; }

    /// <summary>How long I/O waits for a dead connection to be replaced before it fails (0: it fails at once).</summary>
    public required ulong DeadConnectionTimeoutSeconds { get; init; }

    /// <summary>The transmission flags the server sent (READ_ONLY, SEND_FLUSH, SEND_FUA, SEND_TRIM, CAN_MULTI_CONN...).</summary>
    public required ulong ServerFlags { get; init; }

    public ulong ClientFlags { get; init; }

    /// <summary>Connected, negotiated sockets in transmission (the descriptors of this process).</summary>
    public required IReadOnlyList<int> SocketDescriptors { get; init; }

    /// <summary>Shown in /sys/block/nbdN/backend; RECONFIGURE must repeat it (Linux 5.14 and later).</summary>
    public string? BackendIdentifier { get; init; }
}

/// <summary>One device of a STATUS answer: whether it has a configuration (is connected).</summary>
public readonly record struct NbdDeviceStatus(uint Index, bool Connected);
