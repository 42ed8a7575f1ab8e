using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Fuzz.Support;

/// <summary>
/// Checks what a server sent against what the protocol allows, given what the client sent: a shadow of both sides
/// that follows the handshake (proto.md "Handshake"), the options, and then every reply in transmission. It is written
/// from the specification, independently of the server's code, so it catches a server that answers an option it
/// was not asked, names the wrong option, acknowledges what it must refuse, invents a cookie, sends a chunk kind the
/// negotiation does not allow, or falls out of step with the client's byte stream.
/// </summary>
/// <remarks>
/// A server may always close the connection at a message boundary (a hard disconnect is its answer to a client that
/// breaks the protocol); a message cut short is a violation.
/// </remarks>
internal sealed partial class ServerTranscript
{
    private readonly byte[] _client;
    private readonly byte[] _server;
    private int _c;
    private int _s;
    private bool _structured;
    private bool _extended;

    private ServerTranscript(byte[] client, byte[] server)
    {
        _client = client;
        _server = server;
    }

    private int ClientLeft => _client.Length - _c;

    private int ServerLeft => _server.Length - _s;

    public static void Check(byte[] client, byte[] server) => new ServerTranscript(client, server).Run();

    private void Run()
    {
        var greeting = Take(ServerGreeting.Length, "the greeting");
        Expect(BinaryPrimitives.ReadUInt64BigEndian(greeting) == NbdMagic.InitPassword
            && BinaryPrimitives.ReadUInt64BigEndian(greeting[8..]) == NbdMagic.OptionMagic, "a greeting without NBDMAGIC IHAVEOPT");
        var serverFlags = (HandshakeFlags)BinaryPrimitives.ReadUInt16BigEndian(greeting[16..]);
        Expect((serverFlags & HandshakeFlags.FixedNewstyle) != 0, "a greeting without FIXED_NEWSTYLE");
        if (ClientLeft < 4)
        {
            ExpectEnd("after the greeting, with no client flags");
            return;
        }

        var clientFlags = (ClientFlags)ReadClient32();
        var noZeroes = (clientFlags & ClientFlags.NoZeroes) != 0 && (serverFlags & HandshakeFlags.NoZeroes) != 0;
        Negotiate(noZeroes);
    }

    private void Negotiate(bool noZeroes)
    {
        while (true)
        {
            if (ClientLeft < OptionHeader.Length || BinaryPrimitives.ReadUInt64BigEndian(_client.AsSpan(_c)) != NbdMagic.OptionMagic)
            {
                ExpectEnd("after the client's last complete option");
                return;
            }

            var option = (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(_client.AsSpan(_c + 8));
            var length = BinaryPrimitives.ReadUInt32BigEndian(_client.AsSpan(_c + 12));
            _c += OptionHeader.Length;
            var complete = length <= (uint)ClientLeft;
            _c += complete ? (int)length : ClientLeft;
            if (ServerLeft == 0)
            {
                return;
            }

            if (option == NbdOption.ExportName)
            {
                Expect(complete, "an answer to EXPORT_NAME whose name never fully arrived");
                var reply = Take(ExportNameReply.ShortLength, "the EXPORT_NAME reply");
                if (!noZeroes)
                {
                    Expect(!Take(NbdLimits.ExportNameReplyPadding, "the EXPORT_NAME reply's zeroes").ContainsAnyExcept((byte)0), "EXPORT_NAME padding that is not zero");
                }

                Transmission(BinaryPrimitives.ReadUInt64BigEndian(reply));
                return;
            }

            var outcome = OptionReplies(option, length, complete, out var exportSize);
            switch (outcome)
            {
                case OptionOutcome.Closed:
                    return;
                case OptionOutcome.Refused:
                    continue;
            }

            switch (option)
            {
                case NbdOption.Abort:
                    ExpectEnd("after acknowledging ABORT");
                    return;
                case NbdOption.StartTls:
                    throw Violation("acknowledged STARTTLS although it has no certificate");
                case NbdOption.StructuredReply:
                    Expect(length == 0, "acknowledged STRUCTURED_REPLY that carried data");
                    _structured = true;
                    break;
                case NbdOption.ExtendedHeaders:
                    Expect(length == 0, "acknowledged EXTENDED_HEADERS that carried data");
                    _extended = true;
                    break;
                case NbdOption.Go:
                    Transmission(exportSize!.Value);
                    return;
                case NbdOption.Info or NbdOption.List or NbdOption.ListMetaContext or NbdOption.SetMetaContext:
                    break;
                default:
                    throw Violation($"acknowledged option {(uint)option}, which it cannot know");
            }
        }
    }

    private enum OptionOutcome
    {
        Acknowledged,
        Refused,
        Closed,
    }

    /// <summary>The replies to one option, up to its final ACK or error.</summary>
    private OptionOutcome OptionReplies(NbdOption option, uint length, bool complete, out ulong? exportSize)
    {
        exportSize = null;
        while (true)
        {
            if (ServerLeft == 0)
            {
                return OptionOutcome.Closed;
            }

            var header = Take(OptionReplyHeader.Length, $"a reply to option {option}");
            Expect(BinaryPrimitives.ReadUInt64BigEndian(header) == NbdMagic.OptionReplyMagic, $"a reply to option {option} without the option reply magic");
            var named = (NbdOption)BinaryPrimitives.ReadUInt32BigEndian(header[8..]);
            var type = (OptionReplyType)BinaryPrimitives.ReadUInt32BigEndian(header[12..]);
            var payloadLength = BinaryPrimitives.ReadUInt32BigEndian(header[16..]);
            Expect(named == option, $"a reply naming option {(uint)named} to option {(uint)option}");
            Expect(payloadLength <= 1 << 20, $"a {payloadLength}-byte reply to option {option}");
            var payload = Take((int)payloadLength, $"the payload of a {type} reply to option {option}");
            if (((uint)type & 0x8000_0000) != 0)
            {
                return OptionOutcome.Refused;
            }

            Expect(complete, $"a {type} reply to option {option} whose {length} bytes of data never fully arrived");
            switch (type)
            {
                case OptionReplyType.Ack:
                    Expect(payloadLength == 0, $"an ACK to {option} with {payloadLength} bytes");
                    Expect(option is not (NbdOption.Go or NbdOption.Info) || exportSize.HasValue, $"an ACK to {option} without NBD_INFO_EXPORT before it");
                    return OptionOutcome.Acknowledged;
                case OptionReplyType.Server:
                    Expect(option == NbdOption.List && payloadLength >= 4
                        && BinaryPrimitives.ReadUInt32BigEndian(payload) <= payloadLength - 4, $"an NBD_REP_SERVER of {payloadLength} bytes to {option}");
                    break;
                case OptionReplyType.Info:
                    Expect(option is NbdOption.Info or NbdOption.Go && payloadLength >= 2, $"an NBD_REP_INFO of {payloadLength} bytes to {option}");
                    if ((InfoType)BinaryPrimitives.ReadUInt16BigEndian(payload) == InfoType.Export)
                    {
                        Expect(payloadLength == InfoReplies.ExportLength, $"an NBD_INFO_EXPORT of {payloadLength} bytes");
                        exportSize = BinaryPrimitives.ReadUInt64BigEndian(payload[2..]);
                    }

                    break;
                case OptionReplyType.MetaContext:
                    Expect(option is NbdOption.ListMetaContext or NbdOption.SetMetaContext && payloadLength > 4, $"an NBD_REP_META_CONTEXT of {payloadLength} bytes to {option}");
                    break;
                default:
                    throw Violation($"an option reply of unknown type {(uint)type} to {option}");
            }
        }
    }

    private uint ReadClient32()
    {
        var value = BinaryPrimitives.ReadUInt32BigEndian(_client.AsSpan(_c));
        _c += 4;
        return value;
    }

    private ReadOnlySpan<byte> Take(int count, string what)
    {
        Expect(count <= ServerLeft, $"{what} cut short: {ServerLeft} of {count} bytes before the server closed");
        var span = _server.AsSpan(_s, count);
        _s += count;
        return span;
    }

    private void ExpectEnd(string when) =>
        Expect(ServerLeft == 0, $"{ServerLeft} more bytes {when}: {Convert.ToHexString(_server.AsSpan(_s, Math.Min(ServerLeft, 32)))}");

    private static void Expect(bool condition, string what)
    {
        if (!condition)
        {
            throw Violation(what);
        }
    }

    private static InvariantViolation Violation(string what) => new($"the server sent {what}");
}
