using System.Diagnostics;
using System.Runtime.CompilerServices;

namespace Spindle.Wire;

/// <summary>
/// The bytes received on a connection and not yet parsed, for server and client alike. Headers are parsed in place;
/// large payloads go straight from the transport into their own buffer once what is already buffered has been copied,
/// so nothing big is copied twice.
/// </summary>
/// <remarks>
/// The synchronous fast path returns at once when the bytes are there (npgsql's NpgsqlReadBuffer.Ensure); the slow
/// path receives. A server receives requests with fills as large as the free space (many small writes per system
/// call); a client caps a fill for a header (<see cref="ReceiveBufferOptions.FillLimit"/>) so that read data, which
/// would have to be copied again from here, mostly lands straight in its destination.
/// </remarks>
public sealed class ReceiveBuffer : IDisposable
{
    /// <summary>Below this, the rest of a payload is pulled through the buffer, which may catch the next header too.</summary>
    private const int DirectReadMinimum = 4096;

    private readonly int _fillLimit;
    private readonly string _peer;
    private readonly string _self;
    private Transport _transport;
    private byte[] _buffer;
    private long _lastReceive = Stopwatch.GetTimestamp();
    private int _start;
    private int _end;
    private int _wanted;

    public ReceiveBuffer(Transport transport, ReceiveBufferOptions options)
    {
        ArgumentNullException.ThrowIfNull(transport);
        ArgumentNullException.ThrowIfNull(options);
        _transport = transport;
        _buffer = BufferPool.Shared.Rent(options.Capacity);
        _fillLimit = Math.Min(options.FillLimit, _buffer.Length);
        _peer = options.PeerName;
        _self = options.SelfName;
    }

    /// <summary>Bytes buffered and not yet consumed.</summary>
    public int Count => _end - _start;

    /// <summary>The buffered bytes.</summary>
    public ReadOnlySpan<byte> Span => _buffer.AsSpan(_start, _end - _start);

    /// <summary>Stopwatch timestamp of the last bytes received: how a connection tells a silent peer from a busy one.</summary>
    public long LastReceive => Volatile.Read(ref _lastReceive);

    /// <summary>
    /// Receives from <paramref name="transport"/> from now on (TLS after NBD_OPT_STARTTLS). Nothing may be buffered:
    /// bytes sent in plain text after the STARTTLS acknowledgement would otherwise be taken as TLS data.
    /// </summary>
    /// <exception cref="InvalidOperationException">Bytes are still buffered.</exception>
    public void ReplaceTransport(Transport transport)
    {
        ArgumentNullException.ThrowIfNull(transport);
        if (Count != 0)
        {
            throw new InvalidOperationException($"{Count} bytes are still buffered from the old transport");
        }

        _transport = transport;
    }

    /// <summary>Takes every buffered byte out (STARTTLS: what the peer sent early belongs to the TLS handshake).</summary>
    public byte[] TakeAll()
    {
        var bytes = Span.ToArray();
        Consume(bytes.Length);
        return bytes;
    }

    public void Consume(int count)
    {
        if ((uint)count > (uint)Count)
        {
            throw new ArgumentOutOfRangeException(nameof(count));
        }

        _start += count;
        if (_start == _end)
        {
            _start = _end = 0;
        }
    }

    /// <summary>
    /// Receives until at least <paramref name="count"/> bytes are buffered. False when the peer closed its side first:
    /// for a message boundary, where that is how a peer ends.
    /// </summary>
    public ValueTask<bool> TryEnsureAsync(int count, CancellationToken cancellationToken) =>
        Count >= count ? new ValueTask<bool>(true) : TryEnsureSlowAsync(count, cancellationToken);

    /// <summary>Receives until at least <paramref name="count"/> bytes are buffered.</summary>
    /// <exception cref="EndOfStreamException">The peer closed first; <paramref name="what"/> names what was awaited.</exception>
    public ValueTask EnsureAsync(int count, string what, CancellationToken cancellationToken) =>
        Count >= count ? ValueTask.CompletedTask : EnsureSlowAsync(count, what, cancellationToken);

    /// <summary>Fills <paramref name="destination"/> exactly: buffered bytes first, then straight from the transport.</summary>
    /// <exception cref="EndOfStreamException">The peer closed before all of it arrived.</exception>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask ReadExactlyAsync(Memory<byte> destination, string what, CancellationToken cancellationToken)
    {
        var fromBuffer = Math.Min(Count, destination.Length);
        _buffer.AsSpan(_start, fromBuffer).CopyTo(destination.Span);
        Consume(fromBuffer);
        var done = fromBuffer;
        while (done < destination.Length)
        {
            var remaining = destination.Length - done;
            if (remaining < DirectReadMinimum)
            {
                await EnsureSlowAsync(remaining, what, cancellationToken).ConfigureAwait(false);
                _buffer.AsSpan(_start, remaining).CopyTo(destination.Span[done..]);
                Consume(remaining);
                return;
            }

            var read = await _transport.ReceiveAsync(destination[done..], cancellationToken).ConfigureAwait(false);
            if (read <= 0)
            {
                throw new EndOfStreamException($"{_peer} closed the connection after {done} of the {destination.Length} bytes of {what}");
            }

            Volatile.Write(ref _lastReceive, Stopwatch.GetTimestamp());
            done += read;
        }
    }

    /// <summary>Reads and drops <paramref name="count"/> bytes (the payload of a refused request or an unknown option).</summary>
    /// <exception cref="EndOfStreamException">The peer closed first.</exception>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask DiscardAsync(long count, string what, CancellationToken cancellationToken)
    {
        while (count > 0)
        {
            if (Count == 0 && !await FillAsync(cancellationToken).ConfigureAwait(false))
            {
                throw new EndOfStreamException($"{_peer} closed the connection in the middle of {what}");
            }

            var take = (int)Math.Min(Count, count);
            Consume(take);
            count -= take;
        }
    }

    public void Dispose()
    {
        var buffer = Interlocked.Exchange(ref _buffer, []);
        if (buffer.Length > 0)
        {
            BufferPool.Shared.Return(buffer);
        }
    }

    /// <summary>Receives once into the free space. False when the peer has closed its side.</summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<bool> FillAsync(CancellationToken cancellationToken)
    {
        if (_end == _buffer.Length)
        {
            Compact();
        }

        var free = _buffer.Length - _end;
        var space = Math.Max(Math.Min(free, _fillLimit), Math.Min(free, _wanted - Count));
        var read = await _transport.ReceiveAsync(_buffer.AsMemory(_end, space), cancellationToken).ConfigureAwait(false);
        if (read <= 0)
        {
            return false;
        }

        Volatile.Write(ref _lastReceive, Stopwatch.GetTimestamp());
        _end += read;
        return true;
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<bool> TryEnsureSlowAsync(int count, CancellationToken cancellationToken)
    {
        Prepare(count);
        while (Count < count)
        {
            if (!await FillAsync(cancellationToken).ConfigureAwait(false))
            {
                return false;
            }
        }

        _wanted = 0;
        return true;
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask EnsureSlowAsync(int count, string what, CancellationToken cancellationToken)
    {
        Prepare(count);
        while (Count < count)
        {
            if (!await FillAsync(cancellationToken).ConfigureAwait(false))
            {
                throw new EndOfStreamException(Count == 0
                    ? $"{_peer} closed the connection while {_self} waited for {what}"
                    : $"{_peer} closed the connection in the middle of {what}");
            }
        }

        _wanted = 0;
    }

    private void Prepare(int count)
    {
        if (count > _buffer.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count), "more than the receive buffer holds");
        }

        if (_buffer.Length - _start < count || _buffer.Length - _end < _fillLimit)
        {
            Compact();
        }

        _wanted = count;
    }

    private void Compact()
    {
        var count = Count;
        if (_start > 0)
        {
            _buffer.AsSpan(_start, count).CopyTo(_buffer);
            _start = 0;
            _end = count;
        }
    }
}

/// <summary>How a <see cref="ReceiveBuffer"/> is sized and how it names its peer.</summary>
public sealed record ReceiveBufferOptions
{
    /// <summary>
    /// A server's: 64 KiB, filled as far as it goes, so a burst of small requests is taken in one system call (a
    /// write's payload that arrives with its header is copied once, which for small writes is cheaper than another
    /// receive).
    /// </summary>
    public static ReceiveBufferOptions Server { get; } = new() { Capacity = 64 * 1024, FillLimit = int.MaxValue, PeerName = "the client", SelfName = "the server" };

    /// <summary>
    /// A client's: 128 KiB, but a fill for a header asks for at most 8 KiB: read data that lands here must be copied
    /// again, so fills stay small and large payloads arrive straight in their destination; a fill still holds
    /// hundreds of small replies.
    /// </summary>
    public static ReceiveBufferOptions Client { get; } = new() { Capacity = 128 * 1024, FillLimit = 8 * 1024, PeerName = "the server", SelfName = "the client" };

    /// <summary>Bytes the buffer holds (a power of two from the pool).</summary>
    public int Capacity { get; init; } = 64 * 1024;

    /// <summary>The most a fill asks for beyond what is needed.</summary>
    public int FillLimit { get; init; } = int.MaxValue;

    /// <summary>"the server" or "the client": how end-of-stream messages name the other side.</summary>
    public string PeerName { get; init; } = "the peer";

    /// <summary>"the client" or "the server": this side, in the same messages.</summary>
    public string SelfName { get; init; } = "this side";
}
