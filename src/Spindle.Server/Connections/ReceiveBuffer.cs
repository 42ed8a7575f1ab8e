using Spindle.Server.Buffers;
using Spindle.Server.Transport;

namespace Spindle.Server.Connections;

/// <summary>
/// The bytes received on a connection and not yet parsed. Headers are parsed in place; large payloads are read
/// straight into their own buffer, so nothing big is copied twice.
/// </summary>
internal sealed class ReceiveBuffer : IDisposable
{
    public const int Capacity = 64 * 1024;

    private ConnectionTransport _transport;
    private byte[] _buffer;
    private int _start;
    private int _end;

    public ReceiveBuffer(ConnectionTransport transport)
    {
        _transport = transport;
        _buffer = BufferPool.Shared.Rent(Capacity);
    }

    /// <summary>Reads from a new transport from now on (after STARTTLS). The buffer must be empty.</summary>
    public void SwitchTransport(ConnectionTransport transport)
    {
        if (Count != 0)
        {
            throw new InvalidOperationException("bytes still buffered from the old transport");
        }

        _transport = transport;
    }

    /// <summary>Bytes buffered and not yet consumed.</summary>
    public int Count => _end - _start;

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

    /// <summary>Receives once more into the free space. False when the peer has closed its side.</summary>
    public async ValueTask<bool> FillAsync(CancellationToken cancellationToken)
    {
        if (_end == _buffer.Length)
        {
            Compact();
        }

        var read = await _transport.ReceiveAsync(_buffer.AsMemory(_end), cancellationToken).ConfigureAwait(false);
        if (read <= 0)
        {
            return false;
        }

        _end += read;
        return true;
    }

    /// <summary>Receives until at least <paramref name="count"/> bytes are buffered. False on end of stream.</summary>
    public ValueTask<bool> EnsureAsync(int count, CancellationToken cancellationToken)
    {
        if (Count >= count)
        {
            return new ValueTask<bool>(true);
        }

        return EnsureSlowAsync(count, cancellationToken);
    }

    /// <summary>Fills <paramref name="destination"/> exactly: buffered bytes first, then straight from the transport.</summary>
    /// <exception cref="EndOfStreamException">The peer closed before all of it arrived.</exception>
    public async ValueTask ReadExactlyAsync(Memory<byte> destination, CancellationToken cancellationToken)
    {
        var fromBuffer = Math.Min(Count, destination.Length);
        _buffer.AsSpan(_start, fromBuffer).CopyTo(destination.Span);
        Consume(fromBuffer);
        var done = fromBuffer;
        while (done < destination.Length)
        {
            var read = await _transport.ReceiveAsync(destination[done..], cancellationToken).ConfigureAwait(false);
            if (read <= 0)
            {
                throw new EndOfStreamException($"peer closed after {done} of {destination.Length} payload bytes");
            }

            done += read;
        }
    }

    /// <summary>Reads and drops <paramref name="count"/> bytes (the payload of a refused request or unknown option).</summary>
    /// <exception cref="EndOfStreamException">The peer closed first.</exception>
    public async ValueTask DiscardAsync(long count, CancellationToken cancellationToken)
    {
        while (count > 0)
        {
            if (Count == 0 && !await FillAsync(cancellationToken).ConfigureAwait(false))
            {
                throw new EndOfStreamException("peer closed inside a payload being discarded");
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

    private async ValueTask<bool> EnsureSlowAsync(int count, CancellationToken cancellationToken)
    {
        if (count > _buffer.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count), "more than the receive buffer holds");
        }

        if (_buffer.Length - _start < count)
        {
            Compact();
        }

        while (Count < count)
        {
            if (!await FillAsync(cancellationToken).ConfigureAwait(false))
            {
                return false;
            }
        }

        return true;
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
