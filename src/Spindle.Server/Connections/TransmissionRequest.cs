using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Server.Negotiation;
using Spindle.Storage;
using Spindle.Wire;

namespace Spindle.Server.Connections;

/// <summary>
/// One request in flight and, once executed, its reply as a list of segments ready for a gathered send. Instances
/// are pooled per connection and reused, so steady-state serving allocates nothing per request.
/// </summary>
internal sealed class TransmissionRequest : IThreadPoolWorkItem
{
    private const int InitialReplyCapacity = 512;

    private readonly NbdConnection _connection;
    private ArraySegment<byte>[] _segments = new ArraySegment<byte>[4];
    private byte[] _reply = GC.AllocateArray<byte>(InitialReplyCapacity, pinned: true);
    private bool _replyPooled;
    private int _segmentCount;

    public TransmissionRequest(NbdConnection connection)
    {
        _connection = connection;
    }

    public NbdRequest Header { get; set; }

    /// <summary>When the request was parsed (Stopwatch ticks), or 0 when no one listens to the latency histogram.</summary>
    public long Started { get; set; }

    /// <summary>
    /// The length the command acts on: the header's length, except for a BLOCK_STATUS whose payload (extended headers)
    /// carries it. For READ and WRITE it is also the payload's size.
    /// </summary>
    public ulong EffectLength { get; set; }

    /// <summary>The metadata contexts a BLOCK_STATUS answers: every selected one, or those its payload names.</summary>
    public IReadOnlyList<SelectedContext> Contexts { get; set; } = [];

    /// <summary>WRITE data received, or the buffer a READ fills. Pooled.</summary>
    public byte[]? Payload { get; private set; }

    public int PayloadLength { get; private set; }

    /// <summary>The payload bytes charged to the connection's <see cref="FlowBudget"/>.</summary>
    public long BudgetBytes { get; set; }

    public NbdError Error { get; private set; }

    public string? ErrorMessage { get; private set; }

    /// <summary>Set for errors raised by the backend (reported with ERROR_OFFSET) rather than by validation.</summary>
    public bool IsBackendError { get; private set; }

    private ExtentList[] _statusLists = [];

    /// <summary>BLOCK_STATUS: one status list per selected context, created on first use and kept across reuse.</summary>
    public ExtentList[] StatusLists(int count, int initialCapacity)
    {
        if (_statusLists.Length < count)
        {
            var grown = new ExtentList[count];
            _statusLists.CopyTo(grown, 0);
            for (var i = _statusLists.Length; i < count; i++)
            {
                grown[i] = new ExtentList(Math.Max(1, initialCapacity));
            }

            _statusLists = grown;
        }

        return _statusLists;
    }

    public Memory<byte> PayloadMemory => Payload.AsMemory(0, PayloadLength);

    /// <summary>Total bytes of the built reply.</summary>
    public long ReplyLength { get; private set; }

    public void Execute() => _connection.Execute(this);

    public void RentPayload(int length)
    {
        PayloadLength = length;
        Payload = length == 0 ? null : BufferPool.Shared.Rent(length);
    }

    public void Fail(NbdError error, string? message, bool fromBackend)
    {
        Error = error;
        ErrorMessage = message;
        IsBackendError = fromBackend;
    }

    /// <summary>Appends the built reply's segments to a gathered send.</summary>
    public void AppendSegments(List<ArraySegment<byte>> destination)
    {
        for (var i = 0; i < _segmentCount; i++)
        {
            destination.Add(_segments[i]);
        }
    }

    /// <summary>
    /// A success with no payload: a 16-byte simple reply (allowed for every command but READ), or with extended headers
    /// (which forbid simple replies) a NONE chunk.
    /// </summary>
    public void BuildSimpleSuccess()
    {
        ResetReply();
        var length = Header.IsExtended ? StructuredReplyChunks.WriteNone(_reply, Header) : SimpleReply.Write(_reply, NbdError.None, Header.Cookie);
        AddReplySegment(0, length);
    }

    /// <summary>An error reply: simple, or with structured replies an ERROR (validation) or ERROR_OFFSET (backend) chunk.</summary>
    public void BuildError(bool structured)
    {
        ResetReply();
        if (!structured && !Header.IsExtended)
        {
            AddReplySegment(0, SimpleReply.Write(_reply, Error, Header.Cookie));
            return;
        }

        var message = ErrorMessage;
        if (message is not null && message.Length > 1024)
        {
            message = message[..1024];
        }

        var withOffset = IsBackendError && Header.Command is not (NbdCommand.Flush or NbdCommand.Disconnect) && EffectLength > 0;
        EnsureReplyCapacity(StructuredReplyChunks.ErrorOffsetLength(message, Header.IsExtended));
        var length = withOffset
            ? StructuredReplyChunks.WriteErrorOffset(_reply, ReplyFlags.Done, Header, Error, message, Header.Offset)
            : StructuredReplyChunks.WriteError(_reply, ReplyFlags.Done, Header, Error, message);
        AddReplySegment(0, length);
    }

    /// <summary>A successful READ: the data after a simple reply, or structured chunks.</summary>
    /// <remarks>
    /// With structured replies the data is cut into granules aligned to absolute offsets (4 KiB, or coarser for large
    /// reads so a reply has at most about 64 chunks); runs of all-zero granules go out as OFFSET_HOLE chunks and are
    /// not sent at all. Random data is recognised at its first non-zero byte, so the check costs next to nothing.
    /// With DF there is exactly one content chunk: a hole only if everything is zero.
    /// </remarks>
    public void BuildReadSuccess(bool structured, bool dontFragment)
    {
        ResetReply();
        var cookie = Header.Cookie;
        var length = PayloadLength;
        if (!structured && !Header.IsExtended)
        {
            AddReplySegment(0, SimpleReply.Write(_reply, NbdError.None, cookie));
            if (length > 0)
            {
                AddSegment(new ArraySegment<byte>(Payload!, 0, length));
            }

            return;
        }

        if (length == 0)
        {
            AddReplySegment(0, StructuredReplyChunks.WriteNone(_reply, Header));
            return;
        }

        var data = Payload.AsSpan(0, length);
        if (dontFragment)
        {
            if (!data.ContainsAnyExcept((byte)0))
            {
                AddReplySegment(0, StructuredReplyChunks.WriteOffsetHole(_reply, ReplyFlags.Done, Header, Header.Offset, (uint)length));
            }
            else
            {
                AddReplySegment(0, StructuredReplyChunks.WriteOffsetDataPrefix(_reply, ReplyFlags.Done, Header, Header.Offset, length));
                AddSegment(new ArraySegment<byte>(Payload!, 0, length));
            }

            return;
        }

        var granule = Math.Max(4096, (int)Math.Min(1 << 30, System.Numerics.BitOperations.RoundUpToPowerOf2((uint)Math.Max(1, length / 64))));
        var offset = Header.Offset;

        // Walk the runs once to count them, so the chunk headers can be sized and the last one marked DONE.
        var runs = CountRuns(data, offset, granule);
        EnsureReplyCapacity(runs * StructuredReplyChunks.OffsetHoleLengthFor(Header.IsExtended));
        var replyPosition = 0;
        var position = 0;
        var run = 0;
        while (position < length)
        {
            var isHole = IsZeroGranule(data, offset, position, granule, out var end);
            while (end < length && IsZeroGranule(data, offset, end, granule, out var next) == isHole)
            {
                end = next;
            }

            var flags = ++run == runs ? ReplyFlags.Done : ReplyFlags.None;
            if (isHole)
            {
                var written = StructuredReplyChunks.WriteOffsetHole(_reply.AsSpan(replyPosition), flags, Header, offset + (ulong)position, (uint)(end - position));
                AddReplySegment(replyPosition, written);
                replyPosition += written;
            }
            else
            {
                var written = StructuredReplyChunks.WriteOffsetDataPrefix(_reply.AsSpan(replyPosition), flags, Header, offset + (ulong)position, end - position);
                AddReplySegment(replyPosition, written);
                AddSegment(new ArraySegment<byte>(Payload!, position, end - position));
                replyPosition += written;
            }

            position = end;
        }
    }

    /// <summary>
    /// One BLOCK_STATUS chunk per answered context (BLOCK_STATUS_EXT with extended headers), from the collected status
    /// lists, clipped to the request; the last chunk carries DONE.
    /// </summary>
    public void BuildBlockStatus(bool requestOne)
    {
        ResetReply();
        var extended = Header.IsExtended;
        var contexts = Contexts;
        var total = 0;
        for (var c = 0; c < contexts.Count; c++)
        {
            var count = requestOne ? 1 : _statusLists[c].Count;
            total += extended ? StructuredReplyChunks.BlockStatusExtendedLength(count) : StructuredReplyChunks.BlockStatusLength(count);
        }

        EnsureReplyCapacity(total);
        var start = 0;
        for (var c = 0; c < contexts.Count; c++)
        {
            var extents = _statusLists[c].Items;
            var count = requestOne ? 1 : extents.Length;
            var remaining = (long)EffectLength;
            var used = 0;
            var position = start + (extended ? StructuredReplyChunks.BlockStatusExtendedLength(0) : StructuredReplyChunks.BlockStatusLength(0));
            for (var i = 0; i < count && remaining > 0; i++)
            {
                // Extents never describe more than was asked: the last one is clipped to the request's end.
                var extentLength = Math.Min(extents[i].Length, remaining);
                if (extended)
                {
                    position += StructuredReplyChunks.WriteBlockStatusExtendedDescriptor(_reply.AsSpan(position), new ExtendedBlockStatusExtent((ulong)extentLength, extents[i].Status));
                }
                else
                {
                    BinaryPrimitives.WriteUInt32BigEndian(_reply.AsSpan(position), (uint)extentLength);
                    BinaryPrimitives.WriteUInt32BigEndian(_reply.AsSpan(position + 4), extents[i].Status);
                    position += 8;
                }

                remaining -= extentLength;
                used++;
            }

            var flags = c == contexts.Count - 1 ? ReplyFlags.Done : ReplyFlags.None;
            if (extended)
            {
                StructuredReplyChunks.WriteBlockStatusExtendedHeader(_reply.AsSpan(start), flags, Header, contexts[c].Id, used);
            }
            else
            {
                StructuredReplyChunks.WriteBlockStatusHeader(_reply.AsSpan(start), flags, Header.Cookie, contexts[c].Id, used);
            }

            AddReplySegment(start, position - start);
            start = position;
        }
    }

    /// <summary>Returns pooled buffers and clears the request for reuse.</summary>
    public void Reset()
    {
        if (Payload is not null)
        {
            BufferPool.Shared.Return(Payload);
            Payload = null;
        }

        PayloadLength = 0;
        BudgetBytes = 0;
        Error = NbdError.None;
        ErrorMessage = null;
        IsBackendError = false;
        ResetReply();
        if (_replyPooled)
        {
            BufferPool.Shared.Return(_reply);
            _reply = GC.AllocateArray<byte>(InitialReplyCapacity, pinned: true);
            _replyPooled = false;
        }

    }

    private static int CountRuns(ReadOnlySpan<byte> data, ulong offset, int granule)
    {
        var runs = 0;
        var position = 0;
        var previous = false;
        while (position < data.Length)
        {
            var isHole = IsZeroGranule(data, offset, position, granule, out var end);
            if (runs == 0 || isHole != previous)
            {
                runs++;
                previous = isHole;
            }

            position = end;
        }

        return runs;
    }

    /// <summary>Whether the granule starting at <paramref name="position"/> (cut at the next aligned boundary) is all zero.</summary>
    private static bool IsZeroGranule(ReadOnlySpan<byte> data, ulong offset, int position, int granule, out int end)
    {
        var absolute = offset + (ulong)position;
        var toBoundary = granule - (int)(absolute & (ulong)(granule - 1));
        end = Math.Min(data.Length, position + toBoundary);
        return !data[position..end].ContainsAnyExcept((byte)0);
    }

    private void ResetReply()
    {
        Array.Clear(_segments, 0, _segmentCount);
        _segmentCount = 0;
        ReplyLength = 0;
    }

    private void EnsureReplyCapacity(int bytes)
    {
        if (_reply.Length >= bytes)
        {
            return;
        }

        if (_replyPooled)
        {
            BufferPool.Shared.Return(_reply);
        }

        _reply = BufferPool.Shared.Rent(bytes);
        _replyPooled = true;
    }

    private void AddReplySegment(int offset, int count) => AddSegment(new ArraySegment<byte>(_reply, offset, count));

    private void AddSegment(ArraySegment<byte> segment)
    {
        if (_segmentCount == _segments.Length)
        {
            Array.Resize(ref _segments, _segments.Length * 2);
        }

        _segments[_segmentCount++] = segment;
        ReplyLength += segment.Count;
    }
}
