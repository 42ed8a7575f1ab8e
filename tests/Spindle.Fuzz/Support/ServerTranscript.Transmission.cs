using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Fuzz.Support;

internal sealed partial class ServerTranscript
{
    private readonly Dictionary<ulong, Queue<SentRequest>> _outstanding = [];

    /// <summary>The client's requests (as the protocol frames them), then every reply the server sent.</summary>
    private void Transmission(ulong exportSize)
    {
        _ = exportSize;
        ShadowRequests();
        while (ServerLeft > 0)
        {
            Expect(ServerLeft >= 4, "a reply cut short");
            var magic = BinaryPrimitives.ReadUInt32BigEndian(_server.AsSpan(_s));
            switch (magic)
            {
                case NbdMagic.SimpleReplyMagic:
                    SimpleReply();
                    break;
                case NbdMagic.StructuredReplyMagic:
                    Expect(_structured && !_extended, _extended ? "a compact chunk with extended headers" : "a structured chunk without structured replies");
                    var chunk = Take(StructuredReplyHeader.Length, "a chunk header");
                    Chunk(BinaryPrimitives.ReadUInt16BigEndian(chunk[4..]), (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(chunk[6..]),
                        BinaryPrimitives.ReadUInt64BigEndian(chunk[8..]), null, BinaryPrimitives.ReadUInt32BigEndian(chunk[16..]));
                    break;
                case NbdMagic.ExtendedReplyMagic:
                    Expect(_extended, "an extended chunk without extended headers");
                    var header = Take(ExtendedReplyHeader.Length, "an extended chunk header");
                    var length = BinaryPrimitives.ReadUInt64BigEndian(header[24..]);
                    Expect(length <= int.MaxValue, $"an extended chunk of {length} bytes");
                    Chunk(BinaryPrimitives.ReadUInt16BigEndian(header[4..]), (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(header[6..]),
                        BinaryPrimitives.ReadUInt64BigEndian(header[8..]), BinaryPrimitives.ReadUInt64BigEndian(header[16..]), length);
                    break;
                default:
                    throw Violation($"a reply with magic 0x{magic:x8}");
            }
        }
    }

    /// <summary>Frames the client's bytes into requests the way a server must (header, then the payload it announces).</summary>
    private void ShadowRequests()
    {
        var headerLength = NbdRequest.HeaderLengthFor(_extended);
        while (ClientLeft >= headerLength)
        {
            var header = _client.AsSpan(_c, headerLength);
            if (BinaryPrimitives.ReadUInt32BigEndian(header) != (_extended ? NbdMagic.ExtendedRequestMagic : NbdMagic.RequestMagic))
            {
                return;
            }

            var flags = (CommandFlags)BinaryPrimitives.ReadUInt16BigEndian(header[4..]);
            var command = (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(header[6..]);
            var request = new SentRequest(command, BinaryPrimitives.ReadUInt64BigEndian(header[8..]), BinaryPrimitives.ReadUInt64BigEndian(header[16..]),
                _extended ? BinaryPrimitives.ReadUInt64BigEndian(header[24..]) : BinaryPrimitives.ReadUInt32BigEndian(header[24..]));
            _c += headerLength;
            if (command == NbdCommand.Disconnect)
            {
                return;
            }

            if (!_outstanding.TryGetValue(request.Cookie, out var queue))
            {
                _outstanding[request.Cookie] = queue = new Queue<SentRequest>();
            }

            queue.Enqueue(request);
            var payload = command == NbdCommand.Write || (_extended && (flags & CommandFlags.PayloadLength) != 0) ? request.Length : 0;
            if (payload > (ulong)ClientLeft)
            {
                return;
            }

            _c += (int)payload;
        }
    }

    /// <summary>
    /// The request a reply answers, or null when the client has several requests in flight under that cookie: the
    /// client broke the protocol ("MUST NOT" reuse a cookie in flight), so which reply is which cannot be known, and
    /// the check ends there.
    /// </summary>
    private SentRequest? Outstanding(ulong cookie, string what)
    {
        Expect(_outstanding.TryGetValue(cookie, out var queue) && queue.Count > 0, $"{what} for cookie 0x{cookie:x}, which no request in flight has");
        return queue!.Count == 1 ? queue.Peek() : null;
    }

    private void Finish(SentRequest request) => _outstanding[request.Cookie].Dequeue();

    private void SimpleReply()
    {
        Expect(!_extended, "a simple reply with extended headers");
        var reply = Take(Protocol.SimpleReply.Length, "a simple reply");
        var error = BinaryPrimitives.ReadUInt32BigEndian(reply[4..]);
        if (Outstanding(BinaryPrimitives.ReadUInt64BigEndian(reply[8..]), "a simple reply") is not { } request)
        {
            _s = _server.Length;
            return;
        }

        Expect(!(_structured && request.Command == NbdCommand.Read), $"a simple reply to {request} with structured replies");
        if (error == 0 && request.Command == NbdCommand.Read)
        {
            Take((int)request.Length, $"the data of {request}");
        }

        Finish(request);
    }

    private void Chunk(ushort flags, ReplyType type, ulong cookie, ulong? echoedOffset, ulong length)
    {
        if (Outstanding(cookie, $"a {type} chunk") is not { } request)
        {
            _s = _server.Length;
            return;
        }

        Expect(echoedOffset is null || echoedOffset == request.Offset, $"an extended chunk for {request} echoing offset {echoedOffset}");
        var payload = Take((int)length, $"the payload of a {type} chunk for {request}");
        var done = (flags & (ushort)ReplyFlags.Done) != 0;
        Expect((flags & ~(ushort)ReplyFlags.Done) == 0, $"chunk flags 0x{flags:x4}");
        switch (type)
        {
            case ReplyType.None:
                Expect(length == 0 && done, $"a NONE chunk of {length} bytes, done {done}");
                break;
            case ReplyType.OffsetData:
                Expect(request.Command == NbdCommand.Read && length >= 9, $"an OFFSET_DATA chunk of {length} bytes for {request}");
                request.Cover(BinaryPrimitives.ReadUInt64BigEndian(payload), length - 8);
                break;
            case ReplyType.OffsetHole:
                Expect(request.Command == NbdCommand.Read && length == 12, $"an OFFSET_HOLE chunk of {length} bytes for {request}");
                var size = BinaryPrimitives.ReadUInt32BigEndian(payload[8..]);
                Expect(size > 0, "an OFFSET_HOLE of size 0");
                request.Cover(BinaryPrimitives.ReadUInt64BigEndian(payload), size);
                break;
            case ReplyType.BlockStatus:
                Expect(request.Command == NbdCommand.BlockStatus && !_extended && length >= 12 && (length - 4) % 8 == 0,
                    $"a BLOCK_STATUS chunk of {length} bytes for {request} (extended headers {_extended})");
                for (var at = 4; at < payload.Length; at += 8)
                {
                    Expect(BinaryPrimitives.ReadUInt32BigEndian(payload[at..]) != 0, "a BLOCK_STATUS extent of length 0");
                }

                break;
            case ReplyType.BlockStatusExtended:
                Expect(request.Command == NbdCommand.BlockStatus && _extended && length >= 24 && (length - 8) % 16 == 0,
                    $"a BLOCK_STATUS_EXT chunk of {length} bytes for {request} (extended headers {_extended})");
                Expect(BinaryPrimitives.ReadUInt32BigEndian(payload[4..]) == (length - 8) / 16, "a BLOCK_STATUS_EXT descriptor count that is not the payload's");
                for (var at = 8; at < payload.Length; at += 16)
                {
                    Expect(BinaryPrimitives.ReadUInt64BigEndian(payload[at..]) != 0, "a BLOCK_STATUS_EXT descriptor of length 0");
                }

                break;
            case ReplyType.Error or ReplyType.ErrorOffset:
                var trailer = type == ReplyType.ErrorOffset ? 8UL : 0;
                Expect(length >= 6 + trailer && BinaryPrimitives.ReadUInt16BigEndian(payload[4..]) + 6UL + trailer == length,
                    $"a {type} chunk of {length} bytes whose message does not fill it");
                Expect(BinaryPrimitives.ReadUInt32BigEndian(payload) != 0, $"a {type} chunk with error 0");
                if (type == ReplyType.ErrorOffset)
                {
                    var offset = BinaryPrimitives.ReadUInt64BigEndian(payload[^8..]);
                    Expect(request.Command != NbdCommand.Flush && offset >= request.Offset && offset - request.Offset < Math.Max(request.Length, 1),
                        $"an ERROR_OFFSET at {offset} for {request}");
                }

                request.Failed = true;
                break;
            default:
                throw Violation($"a chunk of unknown type {(ushort)type} for {request}");
        }

        if (done)
        {
            Expect(request.Command != NbdCommand.Read || request.Failed || request.Covered == request.Length,
                $"a successful reply to {request} that covers {request.Covered} of its bytes");
            Finish(request);
        }
    }

    private sealed class SentRequest(NbdCommand command, ulong cookie, ulong offset, ulong length)
    {
        private readonly List<(ulong Start, ulong Length)> _ranges = [];

        public NbdCommand Command { get; } = command;

        public ulong Cookie { get; } = cookie;

        public ulong Offset { get; } = offset;

        public ulong Length { get; } = length;

        public bool Failed { get; set; }

        public ulong Covered { get; private set; }

        /// <summary>A content chunk: inside the request, overlapping no other (proto.md "Structured reply chunk types").</summary>
        public void Cover(ulong start, ulong length)
        {
            Expect(start >= Offset && length <= Length && start - Offset <= Length - length, $"content at {start} length {length} outside {this}");
            foreach (var (otherStart, otherLength) in _ranges)
            {
                Expect(start + length <= otherStart || otherStart + otherLength <= start, $"content at {start} length {length} overlapping other content of {this}");
            }

            _ranges.Add((start, length));
            Covered += length;
        }

        public override string ToString() => $"{Command} cookie=0x{Cookie:x} offset={Offset} length={Length}";
    }
}
