using Spindle.Devices.Nbd;
using Spindle.Devices.Netlink;
using Xunit;

namespace Spindle.Devices.Tests;

/// <summary>
/// The netlink messages Spindle sends to the nbd driver, byte for byte (include/uapi/linux/netlink.h, genetlink.h,
/// nbd-netlink.h; host byte order, little-endian here), and the answers it reads, malformed ones included. These run
/// on any Linux machine: no nbd driver needed.
/// </summary>
public sealed class NetlinkCodecTests
{
    [Fact]
    public void GetFamily_asks_the_controller_for_nbd()
    {
        var bytes = GenericNetlinkControl.GetFamily(0x01020304, "nbd");
        Assert.Equal(Hex(
            "1c000000 1000 0500 04030201 00000000", // nlmsghdr: 28 bytes, GENL_ID_CTRL, REQUEST|ACK, seq, port 0
            "03 01 0000",                           // CTRL_CMD_GETFAMILY, version 1
            "0800 0200 6e626400"),                  // CTRL_ATTR_FAMILY_NAME "nbd\0"
            bytes);
    }

    [Fact]
    public void Connect_carries_every_setting_and_the_sockets_nested_twice()
    {
        var bytes = NbdNetlinkMessages.Connect(0x22, 7, new NbdConnectParameters
        {
            Index = 3,
            SizeBytes = 1 << 20,
            BlockSize = 512,
            TimeoutSeconds = 10,
            DeadConnectionTimeoutSeconds = 300,
            ServerFlags = 0x012d,
            SocketDescriptors = [5, 9],
            BackendIdentifier = "ab",
        });
        Assert.Equal(Hex(
            "88000000 2200 0500 07000000 00000000", // 136 bytes, family 0x22, REQUEST|ACK, seq 7
            "01 01 0000",                           // NBD_CMD_CONNECT, version 1
            "0800 0100 03000000",                   // INDEX 3
            "0c00 0200 0000100000000000",           // SIZE_BYTES 1 MiB
            "0c00 0300 0002000000000000",           // BLOCK_SIZE_BYTES 512
            "0c00 0400 0a00000000000000",           // TIMEOUT 10
            "0c00 0800 2c01000000000000",           // DEAD_CONN_TIMEOUT 300
            "0c00 0500 2d01000000000000",           // SERVER_FLAGS
            "0c00 0600 0000000000000000",           // CLIENT_FLAGS 0
            "1c00 0780",                            // SOCKETS (NLA_F_NESTED), 28 bytes
            "0c00 0180 0800 0100 05000000",         //   SOCK_ITEM { SOCK_FD 5 }
            "0c00 0180 0800 0100 09000000",         //   SOCK_ITEM { SOCK_FD 9 }
            "0700 0a00 616200 00"),                 // BACKEND_IDENTIFIER "ab\0", padded
            bytes);
    }

    [Fact]
    public void Reconfigure_repeats_the_backend_and_names_the_new_socket()
    {
        var bytes = NbdNetlinkMessages.Reconfigure(0x22, 8, 0, [12], "x");
        Assert.Equal(Hex(
            "34000000 2200 0500 08000000 00000000",
            "03 01 0000",                           // NBD_CMD_RECONFIGURE
            "0800 0100 00000000",                   // INDEX 0
            "0600 0a00 7800 0000",                  // BACKEND_IDENTIFIER "x\0"
            "1000 0780 0c00 0180 0800 0100 0c000000"),
            bytes);
    }

    [Fact]
    public void Disconnect_and_status_name_the_device()
    {
        Assert.Equal(Hex("1c000000 2200 0500 09000000 00000000", "02 01 0000", "0800 0100 01000000"),
            NbdNetlinkMessages.Disconnect(0x22, 9, 1));
        Assert.Equal(Hex("14000000 2200 0500 0a000000 00000000", "05 01 0000"),
            NbdNetlinkMessages.Status(0x22, 10, null));
    }

    [Fact]
    public void A_family_answer_gives_the_id_and_the_multicast_group()
    {
        // As the controller sends it: FAMILY_NAME, FAMILY_ID (u16, padded), other attributes, MCAST_GROUPS nested.
        var payload = Hex(
            "01 02 0000",
            "0800 0200 6e626400",
            "0600 0100 2200 0000",
            "0800 0300 01000000",
            "2400 0700",
            "  2000 0100 1100 0100 6e62645f6d635f67726f757000 000000 0800 0200 0b000000");
        var groups = new Dictionary<string, uint>();
        Assert.True(GenericNetlinkControl.TryReadFamily(payload, out var id, groups));
        Assert.Equal(0x22, id);
        Assert.Equal(11u, groups[NbdNetlinkMessages.MulticastGroupName]);
    }

    [Fact]
    public void Index_answers_and_link_dead_notifications_are_read_and_bad_ones_refused()
    {
        Assert.True(NbdNetlinkMessages.TryReadIndex(Hex("01 01 0000", "0800 0100 04000000"), NbdNetlinkMessages.CommandConnect, out var index));
        Assert.Equal(4u, index);
        Assert.True(NbdNetlinkMessages.TryReadIndex(Hex("04 01 0000", "0800 0100 02000000"), NbdNetlinkMessages.CommandLinkDead, out index));
        Assert.Equal(2u, index);

        // Another command, a u32 of 2 bytes, an attribute longer than the message, no index at all.
        Assert.False(NbdNetlinkMessages.TryReadIndex(Hex("05 01 0000", "0800 0100 02000000"), NbdNetlinkMessages.CommandLinkDead, out _));
        Assert.False(NbdNetlinkMessages.TryReadIndex(Hex("04 01 0000", "0600 0100 0200 0000"), NbdNetlinkMessages.CommandLinkDead, out _));
        Assert.False(NbdNetlinkMessages.TryReadIndex(Hex("04 01 0000", "4000 0100 02000000"), NbdNetlinkMessages.CommandLinkDead, out _));
        Assert.False(NbdNetlinkMessages.TryReadIndex(Hex("04 01 0000"), NbdNetlinkMessages.CommandLinkDead, out _));
        Assert.False(NbdNetlinkMessages.TryReadIndex(Hex("04 01"), NbdNetlinkMessages.CommandLinkDead, out _));
    }

    [Fact]
    public void A_status_answer_lists_devices_and_whether_they_are_connected()
    {
        var payload = Hex(
            "05 01 0000",
            "2c00 0900",                                            // DEVICE_LIST (no NESTED flag: nla_nest_start_noflag)
            "  1400 0100 0800 0100 00000000 0500 0200 01 000000",   //   { INDEX 0, CONNECTED 1 }
            "  1400 0100 0800 0100 07000000 0500 0200 00 000000");  //   { INDEX 7, CONNECTED 0 }
        var devices = new List<NbdDeviceStatus>();
        Assert.True(NbdNetlinkMessages.TryReadStatus(payload, devices));
        Assert.Equal([new NbdDeviceStatus(0, true), new NbdDeviceStatus(7, false)], devices);

        // A device item without its index is refused, not guessed.
        Assert.False(NbdNetlinkMessages.TryReadStatus(Hex("05 01 0000", "1000 0900", "  0c00 0100 0500 0200 01 000000"), []));
    }

    [Fact]
    public void Datagrams_split_into_messages_and_errors_carry_their_errno()
    {
        // An answer (16 + 12 bytes) followed by the acknowledgement (NLMSG_ERROR 0) for sequence 5.
        var datagram = Hex(
            "1c000000 2200 0000 05000000 00000000", "01 01 0000 0800 0100 00000000",
            "24000000 0200 0001 05000000 00000000", "00000000", "1c000000 2200 0500 05000000 00000000");
        var reader = new NetlinkDatagramReader(datagram);
        Assert.True(reader.TryNext(out var first));
        Assert.Equal(0x22, first.Header.Type);
        Assert.Equal(8, first.Payload.Length - GenericHeader.Size);
        Assert.True(reader.TryNext(out var ack));
        Assert.True(ack.TryReadError(out var error, out var sequence));
        Assert.Equal((0, 5u), (error, sequence));
        Assert.False(reader.TryNext(out _));
        Assert.False(reader.IsMalformed);

        // -EBUSY (nbdN already in use).
        var busy = new NetlinkDatagramReader(Hex("24000000 0200 0000 06000000 00000000", "f0ffffff", "1c000000 2200 0500 06000000 00000000"));
        Assert.True(busy.TryNext(out var refusal));
        Assert.True(refusal.TryReadError(out error, out _));
        Assert.Equal(-16, error);

        // A length past the datagram, and one below the header, are malformed.
        var truncated = new NetlinkDatagramReader(Hex("40000000 2200 0000 05000000 00000000"));
        Assert.False(truncated.TryNext(out _));
        Assert.True(truncated.IsMalformed);
        var tiny = new NetlinkDatagramReader(Hex("08000000 2200 0000 05000000 00000000"));
        Assert.False(tiny.TryNext(out _));
        Assert.True(tiny.IsMalformed);
    }

    private static byte[] Hex(params string[] parts) => Convert.FromHexString(string.Concat(parts).Replace(" ", string.Empty, StringComparison.Ordinal));
}
