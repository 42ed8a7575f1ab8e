using System.Diagnostics;
using System.Threading.Tasks.Sources;
using Spindle.Protocol;

namespace Spindle.Client.Connection;

/// <summary>
/// One request from submission until its reply: everything needed to send it again (command, flags, range, the
/// caller's payload or destination memory), its cookie on the current connection, and the caller's awaitable.
/// </summary>
/// <remarks>
/// <para>The logical client keeps every operation until the server acknowledges it (or the connection it went out
/// on fails), so a later reconnecting client can replay what was unacknowledged: NBD reads and writes are
/// idempotent. The caller's memory stays valid for that long because the caller is still awaiting.</para>
/// <para>The caller may be released early (cancellation, timeout, connection failure), but never while the writer
/// is still sending its payload or the reader is still filling its buffer: such a release is deferred until that
/// I/O ends, so released memory is never touched again. A reply that arrives for an abandoned operation is read
/// and dropped.</para>
/// <para>One allocation per request (this object, which is also the <see cref="IValueTaskSource"/> the caller
/// awaits); operations are not pooled, so a late reply can never reach a recycled object.</para>
/// </remarks>
internal sealed class NbdOperation : IValueTaskSource
{
    /// <summary>Stands for "succeeded" in <see cref="_deferred"/>.</summary>
    private static readonly Exception SuccessMarker = new InvalidOperationException("success");

    private readonly Lock _gate = new();
    private ManualResetValueTaskSourceCore<bool> _core;
    private CancellationTokenRegistration _cancellation;
    private TaskCompletionSource? _finishedObserver;
    private Exception? _deferred;
    private int _io;
    private bool _released;
    private bool _onWire;
    private bool _finished;

    // Reply state, touched only by the connection's reader.
    private long _firstChunkStart = -1;
    private long _firstChunkLength;
    private List<(long Start, long Length)>? _moreChunks;

    private NbdOperation(NbdCommand command, CommandFlags flags, long offset, long length)
    {
        Command = command;
        Flags = flags;
        Offset = offset;
        Length = length;
        _core.RunContinuationsAsynchronously = true;
    }

    public NbdCommand Command { get; }

    public CommandFlags Flags { get; }

    public long Offset { get; }

    /// <summary>The length field of the request (at most 2^32 - 1; the logical client splits longer effects).</summary>
    public long Length { get; }

    /// <summary>WRITE's payload: the caller's memory, valid while the caller awaits.</summary>
    public ReadOnlyMemory<byte> Payload { get; private init; }

    /// <summary>READ's destination: the caller's memory.</summary>
    public Memory<byte> Buffer { get; private init; }

    /// <summary>BLOCK_STATUS: the context whose extents the caller wants.</summary>
    public string? Context { get; private init; }

    /// <summary>BLOCK_STATUS: the extents received for <see cref="Context"/>.</summary>
    public List<StatusExtent>? Extents { get; private set; }

    /// <summary>The cookie on the connection it was last submitted to.</summary>
    public ulong Cookie { get; set; }

    /// <summary>Stopwatch timestamp after which the request times out; 0 for never.</summary>
    public long Deadline { get; set; }

    /// <summary>The first error chunk of a structured reply (the spec: assume nothing about partial success).</summary>
    public Exception? ReplyError { get; set; }

    /// <summary>Set when a BLOCK_STATUS chunk for <see cref="Context"/> arrived.</summary>
    public bool SawContext { get; set; }

    /// <summary>Links in the logical client's list of unacknowledged operations.</summary>
    internal NbdOperation? Previous { get; set; }

    internal NbdOperation? Next { get; set; }

    /// <summary>The next operation in the logical client's queue of requests waiting for a connection.</summary>
    internal NbdOperation? WaitNext { get; set; }

    /// <summary>A FLUSH meant for one path of a multipath client (-1: any connection will do).</summary>
    internal int PreferredPath { get; set; } = -1;

    /// <summary>How many times the request was sent again after a connection was lost.</summary>
    public int Resends { get; private set; }

    internal Action<NbdOperation>? OnFinished { get; set; }

    public bool HasPayload => Command == NbdCommand.Write;

    /// <summary>WRITE, WRITE_ZEROES and TRIM change data: a FLUSH waits for them.</summary>
    public bool ChangesData => Command is NbdCommand.Write or NbdCommand.WriteZeroes or NbdCommand.Trim;

    /// <summary>True once the caller has been released (completed, cancelled, timed out or failed).</summary>
    public bool IsReleased
    {
        get
        {
            lock (_gate)
            {
                return _released;
            }
        }
    }

    public short Version => _core.Version;

    public static NbdOperation Read(long offset, Memory<byte> buffer, CommandFlags flags) =>
        new(NbdCommand.Read, flags, offset, buffer.Length) { Buffer = buffer };

    public static NbdOperation Write(long offset, ReadOnlyMemory<byte> payload, CommandFlags flags) =>
        new(NbdCommand.Write, flags, offset, payload.Length) { Payload = payload };

    public static NbdOperation BlockStatus(long offset, long length, string context, CommandFlags flags) =>
        new(NbdCommand.BlockStatus, flags, offset, length) { Context = context, Extents = [] };

    public static NbdOperation Effect(NbdCommand command, long offset, long length, CommandFlags flags) =>
        new(command, flags, offset, length);

    /// <summary>
    /// The request header: compact (32-bit length), or extended (64-bit length; a WRITE says its payload follows with
    /// NBD_CMD_FLAG_PAYLOAD_LEN, which extended headers make mandatory).
    /// </summary>
    public NbdRequest ToRequest(bool extended) => extended
        ? new(HasPayload ? Flags | CommandFlags.PayloadLength : Flags, Command, Cookie, (ulong)Offset, (ulong)Length, extended: true)
        : new(Flags, Command, Cookie, (ulong)Offset, checked((uint)Length));

    public ValueTask AsValueTask() => new(this, _core.Version);

    public void RegisterCancellation(CancellationToken cancellationToken)
    {
        if (cancellationToken.CanBeCanceled)
        {
            _cancellation = cancellationToken.UnsafeRegister(
                static (state, token) => ((NbdOperation)state!).Abandon(new OperationCanceledException(token)),
                this);
        }
    }

    /// <summary>
    /// Forgets what the lost connection did with the request (cookie, reply chunks, errors), so it can be sent again
    /// on another one. Called only once that connection's loops have stopped: nothing else touches the reply state.
    /// </summary>
    public void ResetForResend()
    {
        _firstChunkStart = -1;
        _firstChunkLength = 0;
        _moreChunks = null;
        ReplyError = null;
        SawContext = false;
        Extents?.Clear();
        Cookie = 0;
        Resends++;
        lock (_gate)
        {
            _onWire = false;
        }
    }

    /// <summary>The writer takes the operation to send. False if the caller already left: do not send it.</summary>
    public bool TryBeginSend()
    {
        lock (_gate)
        {
            if (_released)
            {
                return false;
            }

            _onWire = true;
            if (HasPayload)
            {
                _io++;
            }

            return true;
        }
    }

    /// <summary>The writer has sent the request (and is done with its payload).</summary>
    public void EndSend()
    {
        if (HasPayload)
        {
            EndIo();
        }
    }

    /// <summary>Whether the request ever reached the wire (an abandoned one that did not needs no reply).</summary>
    public bool IsOnWire
    {
        get
        {
            lock (_gate)
            {
                return _onWire;
            }
        }
    }

    /// <summary>The reader is about to write into <see cref="Buffer"/>. False if the caller left: drop the data.</summary>
    public bool TryBeginReceive()
    {
        lock (_gate)
        {
            if (_released)
            {
                return false;
            }

            _io++;
            return true;
        }
    }

    public void EndReceive() => EndIo();

    /// <summary>Releases the caller early: cancellation, timeout or a failed connection. Deferred while I/O is under way.</summary>
    public void Abandon(Exception error)
    {
        lock (_gate)
        {
            if (_released)
            {
                return;
            }

            if (_io > 0)
            {
                _deferred ??= error;
                return;
            }

            _released = true;
        }

        ReleaseCaller(error);
    }

    /// <summary>
    /// The reply arrived (or the operation will never get one): releases the caller (after any I/O still under way
    /// on its memory) and wakes FLUSH barriers.
    /// </summary>
    public void Finish(Exception? error)
    {
        var release = false;
        TaskCompletionSource? observer;
        lock (_gate)
        {
            if (!_released)
            {
                if (_io > 0)
                {
                    // The writer is still sending the payload (a server that replied early): release when it is done.
                    _deferred ??= error ?? SuccessMarker;
                }
                else
                {
                    _released = true;
                    release = true;
                }
            }

            _finished = true;
            observer = _finishedObserver;
        }

        if (release)
        {
            ReleaseCaller(error);
        }

        observer?.TrySetResult();
        OnFinished?.Invoke(this);
    }

    /// <summary>A task that completes when the server has answered (or never will): what a FLUSH barrier waits for.</summary>
    public Task WhenFinished()
    {
        lock (_gate)
        {
            if (_finished)
            {
                return Task.CompletedTask;
            }

            _finishedObserver ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            return _finishedObserver.Task;
        }
    }

    /// <summary>
    /// Records that the reply described [<paramref name="start"/>, +<paramref name="length"/>) of a READ (relative
    /// to <see cref="Offset"/>). Range checks happen before; overlap and gaps are checked by <see cref="IsFullyCovered"/>.
    /// </summary>
    public void AddChunk(long start, long length)
    {
        if (_firstChunkStart < 0)
        {
            _firstChunkStart = start;
            _firstChunkLength = length;
            return;
        }

        _moreChunks ??= [];
        if (_moreChunks.Count >= 1 << 20)
        {
            throw new NbdProtocolException($"READ reply of more than {1 << 20} chunks");
        }

        _moreChunks.Add((start, length));
    }

    /// <summary>True if the READ reply's chunks cover the request exactly once ("MUST NOT overlap", "MUST cover").</summary>
    public bool IsFullyCovered(out string problem)
    {
        problem = string.Empty;
        if (_firstChunkStart < 0)
        {
            if (Length == 0)
            {
                return true;
            }

            problem = "no data or hole chunk";
            return false;
        }

        if (_moreChunks is null)
        {
            if (_firstChunkStart == 0 && _firstChunkLength == Length)
            {
                return true;
            }

            problem = $"one chunk covering {_firstChunkLength} of {Length} bytes";
            return false;
        }

        _moreChunks.Add((_firstChunkStart, _firstChunkLength));
        _moreChunks.Sort(static (a, b) => a.Start.CompareTo(b.Start));
        long position = 0;
        foreach (var (start, length) in _moreChunks)
        {
            if (start != position)
            {
                problem = start < position ? $"chunks overlap at byte {start}" : $"no chunk covers byte {position}";
                return false;
            }

            position += length;
        }

        if (position != Length)
        {
            problem = $"chunks end at byte {position} of {Length}";
            return false;
        }

        return true;
    }

    public void GetResult(short token)
    {
        _core.GetResult(token);
    }

    public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

    public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);

    public override string ToString()
    {
        var text = $"{NbdServerErrorException.CommandName(Command)} offset {Offset} length {Length}";
        return Flags == CommandFlags.None ? text : $"{text} flags {Flags}";
    }

    /// <summary>Stopwatch timestamp <paramref name="timeout"/> from now, or 0 for an infinite timeout.</summary>
    public static long DeadlineFrom(TimeSpan timeout) =>
        timeout == Timeout.InfiniteTimeSpan ? 0 : Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);

    private void EndIo()
    {
        Exception? deferred = null;
        lock (_gate)
        {
            _io--;
            if (_io == 0 && _deferred is not null && !_released)
            {
                _released = true;
                deferred = _deferred;
            }
        }

        if (deferred is not null)
        {
            ReleaseCaller(ReferenceEquals(deferred, SuccessMarker) ? null : deferred);
        }
    }

    private void ReleaseCaller(Exception? error)
    {
        // Never dispose the registration from inside its own callback's thread while holding the gate; here no lock is held.
        _cancellation.Dispose();
        if (error is null)
        {
            _core.SetResult(true);
        }
        else
        {
            _core.SetException(error);
        }
    }
}

/// <summary>One run of a BLOCK_STATUS answer as received: a length (64 bits with extended headers) and a status word.</summary>
internal readonly record struct StatusExtent(long Length, uint Flags);
