using System.Buffers.Binary;

namespace Spindle.Protocol;

/// <summary>
/// The server's first message in newstyle negotiation (18 bytes).
/// </summary>
/// <remarks>
/// <code>
///  0                       8                       16      18
///  +-----------------------+-----------------------+-------+
///  | "NBDMAGIC"            | "IHAVEOPT"            | flags |
///  +-----------------------+-----------------------+-------+
/// </code>
/// The client answers with 32 bits of <see cref="ClientFlags"/>.
/// </remarks>
public static class ServerGreeting
{
    public const int Length = NbdLimits.ServerGreetingLength;

    public static int Write(Span<byte> destination, HandshakeFlags flags)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.InitPassword);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], NbdMagic.OptionMagic);
        BinaryPrimitives.WriteUInt16BigEndian(destination[16..], (ushort)flags);
        return Length;
    }

    /// <summary>
    /// Parses the greeting. <see cref="ParseStatus.Invalid"/> covers both garbage and an oldstyle server
    /// (whose second magic is cliserv_magic); <paramref name="isOldstyle"/> tells them apart.
    /// </summary>
    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out HandshakeFlags flags, out bool isOldstyle)
    {
        flags = HandshakeFlags.None;
        isOldstyle = false;
        if (source.Length < 16)
        {
            return ParseStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt64BigEndian(source) != NbdMagic.InitPassword)
        {
            return ParseStatus.Invalid;
        }

        var second = BinaryPrimitives.ReadUInt64BigEndian(source[8..]);
        if (second == NbdMagic.OldstyleMagic)
        {
            isOldstyle = true;
            return ParseStatus.Invalid;
        }

        if (second != NbdMagic.OptionMagic)
        {
            return ParseStatus.Invalid;
        }

        if (source.Length < Length)
        {
            return ParseStatus.NeedMoreData;
        }

        flags = (HandshakeFlags)BinaryPrimitives.ReadUInt16BigEndian(source[16..]);
        return ParseStatus.Done;
    }
}

/// <summary>
/// A client option header (16 bytes) followed by <see cref="DataLength"/> bytes of option data.
/// </summary>
/// <remarks>
/// <code>
///  0                       8               12              16
///  +-----------------------+---------------+---------------+
///  | "IHAVEOPT"            | option (u32)  | length (u32)  |
///  +-----------------------+---------------+---------------+
/// </code>
/// </remarks>
public readonly record struct OptionHeader(NbdOption Option, uint DataLength)
{
    public const int Length = NbdLimits.OptionHeaderLength;

    public static int Write(Span<byte> destination, NbdOption option, uint dataLength)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.OptionMagic);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], dataLength);
        return Length;
    }

    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out OptionHeader header)
    {
        header = default;
        if (source.Length < Length)
        {
            return ParseStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt64BigEndian(source) != NbdMagic.OptionMagic)
        {
            return ParseStatus.Invalid;
        }

        header = new OptionHeader(
            (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[12..]));
        return ParseStatus.Done;
    }
}

/// <summary>
/// A fixed-newstyle option reply header (20 bytes) followed by <see cref="DataLength"/> bytes.
/// </summary>
/// <remarks>
/// <code>
///  0                       8               12              16              20
///  +-----------------------+---------------+---------------+---------------+
///  | 0x0003e889045565a9    | option (u32)  | type (u32)    | length (u32)  |
///  +-----------------------+---------------+---------------+---------------+
/// </code>
/// </remarks>
public readonly record struct OptionReplyHeader(NbdOption Option, OptionReplyType Type, uint DataLength)
{
    public const int Length = NbdLimits.OptionReplyHeaderLength;

    public bool IsError => ((uint)Type & 0x80000000) != 0;

    public static int Write(Span<byte> destination, NbdOption option, OptionReplyType type, uint dataLength)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.OptionReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], (uint)type);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], dataLength);
        return Length;
    }

    public static ParseStatus TryRead(ReadOnlySpan<byte> source, out OptionReplyHeader header)
    {
        header = default;
        if (source.Length < Length)
        {
            return ParseStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt64BigEndian(source) != NbdMagic.OptionReplyMagic)
        {
            return ParseStatus.Invalid;
        }

        header = new OptionReplyHeader(
            (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(source[8..]),
            (OptionReplyType)BinaryPrimitives.ReadUInt32BigEndian(source[12..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[16..]));
        return ParseStatus.Done;
    }
}

/// <summary>
/// The reply to NBD_OPT_EXPORT_NAME: export size, transmission flags and, unless NO_ZEROES was agreed,
/// 124 bytes of zeroes. It has no option-reply header and no way to report an error.
/// </summary>
public static class ExportNameReply
{
    public const int ShortLength = 10;
    public const int FullLength = ShortLength + NbdLimits.ExportNameReplyPadding;

    public static int Write(Span<byte> destination, ulong exportSize, TransmissionFlags flags, bool noZeroes)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, exportSize);
        BinaryPrimitives.WriteUInt16BigEndian(destination[8..], (ushort)flags);
        if (noZeroes)
        {
            return ShortLength;
        }

        destination.Slice(ShortLength, NbdLimits.ExportNameReplyPadding).Clear();
        return FullLength;
    }

    public static bool TryRead(ReadOnlySpan<byte> source, out ulong exportSize, out TransmissionFlags flags)
    {
        exportSize = 0;
        flags = TransmissionFlags.None;
        if (source.Length < ShortLength)
        {
            return false;
        }

        exportSize = BinaryPrimitives.ReadUInt64BigEndian(source);
        flags = (TransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(source[8..]);
        return true;
    }
}
