namespace Spindle.Devices.Netlink;

/// <summary>
/// The generic netlink controller "nlctrl" (family id 0x10): resolves a family name to the id its messages carry
/// and to the ids of its multicast groups (include/uapi/linux/genetlink.h).
/// </summary>
internal static class GenericNetlinkControl
{
    public const ushort ControllerId = 0x10;

    public const byte CommandGetFamily = 3;

    public const ushort AttrFamilyId = 1;
    public const ushort AttrFamilyName = 2;
    public const ushort AttrMulticastGroups = 7;

    // Inside CTRL_ATTR_MCAST_GROUPS: one nested attribute per group (numbered from 1) { NAME string, ID u32 }.
    public const ushort AttrGroupName = 1;
    public const ushort AttrGroupId = 2;

    /// <summary>CTRL_CMD_GETFAMILY for <paramref name="name"/> (asking for it may load the module that provides it).</summary>
    public static byte[] GetFamily(uint sequence, string name) =>
        new NetlinkRequestBuilder(ControllerId, NetlinkHeader.FlagRequest | NetlinkHeader.FlagAck, sequence, CommandGetFamily, 1)
            .String(AttrFamilyName, name)
            .ToArray();

    /// <summary>Reads a GETFAMILY answer: the family id and its multicast groups by name.</summary>
    public static bool TryReadFamily(ReadOnlySpan<byte> genericPayload, out ushort familyId, Dictionary<string, uint> groups)
    {
        ArgumentNullException.ThrowIfNull(groups);
        familyId = 0;
        if (!GenericHeader.TryRead(genericPayload, out _))
        {
            return false;
        }

        var reader = new NetlinkAttributeReader(genericPayload[GenericHeader.Size..]);
        while (reader.TryNext(out var type, out var value))
        {
            if (type == AttrFamilyId)
            {
                if (!NetlinkAttributeReader.TryReadU16(value, out familyId))
                {
                    return false;
                }
            }
            else if (type == AttrMulticastGroups && !TryReadGroups(value, groups))
            {
                return false;
            }
        }

        return !reader.IsMalformed && familyId != 0;
    }

    private static bool TryReadGroups(ReadOnlySpan<byte> value, Dictionary<string, uint> groups)
    {
        var entries = new NetlinkAttributeReader(value);
        while (entries.TryNext(out _, out var entry))
        {
            string? name = null;
            uint? id = null;
            var fields = new NetlinkAttributeReader(entry);
            while (fields.TryNext(out var field, out var data))
            {
                if (field == AttrGroupName && NetlinkAttributeReader.TryReadString(data, out var text))
                {
                    name = text;
                }
                else if (field == AttrGroupId && NetlinkAttributeReader.TryReadU32(data, out var number))
                {
                    id = number;
                }
            }

            if (fields.IsMalformed)
            {
                return false;
            }

            if (name is not null && id is not null)
            {
                groups[name] = id.Value;
            }
        }

        return !entries.IsMalformed;
    }
}
