using System.Buffers;
using System.Runtime.CompilerServices;

namespace Spindle.Client.Transport;

/// <summary>
/// Bytes received and not yet parsed. Headers are parsed in place; read data goes straight from the socket into the
/// caller's buffer once what is already buffered has been copied, so large payloads are never copied twice.
/// </summary>
internal sealed class ReceiveBuffer : IDisposable
{
    public const int Capacity = 128 * 1024;

    /// <summary>
    /// The most a fill for a header asks the socket for. Read data that lands in this buffer must be copied again,
    /// so fills stay small and a large payload mostly arrives straight in its destination; a fill still holds
    /// hundreds of small replies.
    /// </summary>
    private const int FillLimit = 8 * 1024;

    private NbdTransport _transport;
    private byte[] _buffer;
    private long _lastReceive = System.Diagnostics.Stopwatch.GetTimestamp();
    private int _start;
    private int _end;
    private int _wanted;

    public ReceiveBuffer(NbdTransport transport)
    {
        _transport = transport;
        _buffer = ArrayPool<byte>.Shared.Rent(Capacity);
    }

    /// <summary>Bytes buffered and not yet consumed.</summary>
    public int Count => _end - _start;

    /// <summary>Stopwatch timestamp of the last bytes received: how a connection tells a silent server from a busy one.</summary>
    public long LastReceive => Volatile.Read(ref _lastReceive);

    /// <summary>
    /// Receives from <paramref name="transport"/> from now on (TLS after NBD_OPT_STARTTLS). Nothing may be buffered:
    /// bytes the server sent in plain text after the STARTTLS acknowledgement would otherwise be taken as TLS data.
    /// </summary>
    /// <exception cref="InvalidOperationException">Bytes are still buffered.</exception>
    public void ReplaceTransport(NbdTransport transport)
    {
        if (Count != 0)
        {
            throw new InvalidOperationException($"{Count} bytes are still buffered");
        }

        _transport = transport;
    }

    public ReadOnlySpan<byte> Span => _buffer.AsSpan(_start, _end - _start);

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

    /// <summary>Receives until at least <paramref name="count"/> bytes are buffered.</summary>
    /// <exception cref="EndOfStreamException">The server closed first; <paramref name="what"/> names what was awaited.</exception>
    public ValueTask EnsureAsync(int count, string what, CancellationToken cancellationToken)
    {
        return Count >= count ? ValueTask.CompletedTask : EnsureSlowAsync(count, what, cancellationToken);
    }

    /// <summary>Fills <paramref name="destination"/> exactly: buffered bytes first, then straight from the transport.</summary>
    /// <exception cref="EndOfStreamException">The server closed before all of it arrived.</exception>
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
            if (remaining < 4096)
            {
                // A short tail: pull it through the buffer, which may also catch the next reply header.
                await EnsureSlowAsync(remaining, what, cancellationToken).ConfigureAwait(false);
                _buffer.AsSpan(_start, remaining).CopyTo(destination.Span[done..]);
                Consume(remaining);
                return;
            }

            var read = await _transport.ReceiveAsync(destination[done..], cancellationToken).ConfigureAwait(false);
            if (read <= 0)
            {
                throw new EndOfStreamException($"the server closed the connection after {done} of the {destination.Length} bytes of {what}");
            }

            Volatile.Write(ref _lastReceive, System.Diagnostics.Stopwatch.GetTimestamp());
            done += read;
        }
    }

    /// <summary>Reads and drops <paramref name="count"/> bytes.</summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask DiscardAsync(long count, string what, CancellationToken cancellationToken)
    {
        while (count > 0)
        {
            if (Count == 0)
            {
                await FillAsync(what, cancellationToken).ConfigureAwait(false);
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
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask FillAsync(string what, CancellationToken cancellationToken)
    {
        if (_end == _buffer.Length)
        {
            Compact();
        }

        var space = Math.Max(Math.Min(_buffer.Length - _end, FillLimit), Math.Min(_buffer.Length - _end, _wanted - Count));
        var read = await _transport.ReceiveAsync(_buffer.AsMemory(_end, space), cancellationToken).ConfigureAwait(false);
        if (read <= 0)
        {
            throw new EndOfStreamException(Count == 0
                ? $"the server closed the connection while the client waited for {what}"
                : $"the server closed the connection in the middle of {what}");
        }

        Volatile.Write(ref _lastReceive, System.Diagnostics.Stopwatch.GetTimestamp());
        _end += read;
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask EnsureSlowAsync(int count, string what, CancellationToken cancellationToken)
    {
        if (count > _buffer.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count), "more than the receive buffer holds");
        }

        if (_buffer.Length - _start < count || _buffer.Length - _end < FillLimit)
        {
            Compact();
        }

        _wanted = count;
        while (Count < count)
        {
            await FillAsync(what, cancellationToken).ConfigureAwait(false);
        }

        _wanted = 0;
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
