using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Fuzz.Support;

/// <summary>Builds protocol byte streams for seeds: what a client or a server says, message by message.</summary>
internal sealed class WireBuilder
{
    private readonly MemoryStream _bytes = new();

    public WireBuilder U8(byte value)
    {
        _bytes.WriteByte(value);
        return this;
    }

    public WireBuilder U16(ushort value) => Put(2, span => BinaryPrimitives.WriteUInt16BigEndian(span, value));

    public WireBuilder U32(uint value) => Put(4, span => BinaryPrimitives.WriteUInt32BigEndian(span, value));

    public WireBuilder U64(ulong value) => Put(8, span => BinaryPrimitives.WriteUInt64BigEndian(span, value));

    public WireBuilder Bytes(ReadOnlySpan<byte> bytes)
    {
        _bytes.Write(bytes);
        return this;
    }

    public WireBuilder Zeroes(int count) => Bytes(new byte[count]);

    /// <summary>The client's handshake flags (fixed newstyle, no zeroes).</summary>
    public WireBuilder ClientFlags(ClientFlags flags = Protocol.ClientFlags.FixedNewstyle | Protocol.ClientFlags.NoZeroes) => U32((uint)flags);

    public WireBuilder Option(NbdOption option, ReadOnlySpan<byte> data = default) =>
        U64(NbdMagic.OptionMagic).U32((uint)option).U32((uint)data.Length).Bytes(data);

    public WireBuilder Request(NbdCommand command, ulong cookie, ulong offset, uint length, CommandFlags flags = CommandFlags.None) =>
        U32(NbdMagic.RequestMagic).U16((ushort)flags).U16((ushort)command).U64(cookie).U64(offset).U32(length);

    public WireBuilder ExtendedRequest(NbdCommand command, ulong cookie, ulong offset, ulong length, CommandFlags flags = CommandFlags.None) =>
        U32(NbdMagic.ExtendedRequestMagic).U16((ushort)flags).U16((ushort)command).U64(cookie).U64(offset).U64(length);

    public WireBuilder OptionReply(NbdOption option, OptionReplyType type, ReadOnlySpan<byte> data = default) =>
        U64(NbdMagic.OptionReplyMagic).U32((uint)option).U32((uint)type).U32((uint)data.Length).Bytes(data);

    public WireBuilder SimpleReply(ulong cookie, NbdError error = NbdError.None) => U32(NbdMagic.SimpleReplyMagic).U32((uint)error).U64(cookie);

    public WireBuilder Chunk(ReplyType type, ulong cookie, ReadOnlySpan<byte> payload, bool done = true) =>
        U32(NbdMagic.StructuredReplyMagic).U16(done ? (ushort)ReplyFlags.Done : (ushort)0).U16((ushort)type).U64(cookie).U32((uint)payload.Length).Bytes(payload);

    public WireBuilder ExtendedChunk(ReplyType type, ulong cookie, ulong offset, ReadOnlySpan<byte> payload, bool done = true) =>
        U32(NbdMagic.ExtendedReplyMagic).U16(done ? (ushort)ReplyFlags.Done : (ushort)0).U16((ushort)type).U64(cookie).U64(offset).U64((ulong)payload.Length).Bytes(payload);

    public byte[] ToArray() => _bytes.ToArray();

    private WireBuilder Put(int count, SpanAction write)
    {
        Span<byte> span = stackalloc byte[8];
        write(span[..count]);
        _bytes.Write(span[..count]);
        return this;
    }

    private delegate void SpanAction(Span<byte> span);
}
