using System.Net;
using System.Net.Security;
using Spindle.Server.Buffers;

namespace Spindle.Server.Transport;

/// <summary>
/// TLS over another transport after NBD_OPT_STARTTLS. Blocking when the transport underneath is (a socket served
/// by its own thread): reads and writes are then synchronous SslStream calls. Gathered sends are coalesced into
/// one buffer so a batch of small replies becomes few TLS records.
/// </summary>
internal sealed class TlsTransport : ConnectionTransport
{
    private const int StagingSize = 64 * 1024;

    private readonly ConnectionTransport _inner;
    private readonly SslStream _tls;
    private byte[]? _staging;

    public TlsTransport(ConnectionTransport inner, SslStream tls)
    {
        _inner = inner;
        _tls = tls;
    }

    public override string RemoteDescription => _inner.RemoteDescription;

    public override IPEndPoint? RemoteIPEndPoint => _inner.RemoteIPEndPoint;

    public override bool IsBlocking => _inner.IsBlocking;

    public SslStream Stream => _tls;

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken) =>
        IsBlocking ? new ValueTask<int>(_tls.Read(buffer.Span)) : _tls.ReadAsync(buffer, cancellationToken);

    public override ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        if (IsBlocking)
        {
            _tls.Write(buffer.Span);
            return ValueTask.CompletedTask;
        }

        return _tls.WriteAsync(buffer, cancellationToken);
    }

    public override async ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(buffers);
        var staging = _staging ??= BufferPool.Shared.Rent(StagingSize);
        var used = 0;
        for (var i = 0; i < buffers.Count; i++)
        {
            var segment = buffers[i];
            if (segment.Count > StagingSize / 4)
            {
                await FlushStagingAsync(staging, used, cancellationToken).ConfigureAwait(false);
                used = 0;
                await SendAsync(segment.AsMemory(), cancellationToken).ConfigureAwait(false);
                continue;
            }

            if (used + segment.Count > StagingSize)
            {
                await FlushStagingAsync(staging, used, cancellationToken).ConfigureAwait(false);
                used = 0;
            }

            segment.AsSpan().CopyTo(staging.AsSpan(used));
            used += segment.Count;
        }

        await FlushStagingAsync(staging, used, cancellationToken).ConfigureAwait(false);
    }

    public override void CancelReceive() => _inner.CancelReceive();

    public override async ValueTask ShutdownSendAsync()
    {
        try
        {
            // close_notify, so the client can tell a clean end from a cut connection.
            if (IsBlocking)
            {
                _tls.ShutdownAsync().GetAwaiter().GetResult();
            }
            else
            {
                await _tls.ShutdownAsync().ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is IOException or ObjectDisposedException or InvalidOperationException)
        {
        }

        await _inner.ShutdownSendAsync().ConfigureAwait(false);
    }

    public override void Abort() => _inner.Abort();

    public override async ValueTask DisposeAsync()
    {
        await _tls.DisposeAsync().ConfigureAwait(false);
        await _inner.DisposeAsync().ConfigureAwait(false);
        if (Interlocked.Exchange(ref _staging, null) is { } staging)
        {
            BufferPool.Shared.Return(staging);
        }
    }

    private ValueTask FlushStagingAsync(byte[] staging, int used, CancellationToken cancellationToken) =>
        used == 0 ? ValueTask.CompletedTask : SendAsync(staging.AsMemory(0, used), cancellationToken);
}

/// <summary>
/// The plain byte stream TLS runs over: the connection's own stream, after any bytes the NBD layer had already
/// buffered (a client that sent its TLS ClientHello without waiting for the STARTTLS acknowledgement).
/// </summary>
internal sealed class PrefixedStream(Stream inner, byte[] prefix) : Stream
{
    private int _prefixPosition;

    public override bool CanRead => true;

    public override bool CanSeek => false;

    public override bool CanWrite => true;

    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => throw new NotSupportedException();
        set => throw new NotSupportedException();
    }

    /// <summary>The stream a transport's bytes flow through, for TLS to wrap.</summary>
    public static Stream For(ConnectionTransport transport, byte[] prefix)
    {
        Stream inner = transport switch
        {
            SocketTransport socket => new System.Net.Sockets.NetworkStream(socket.Socket, ownsSocket: false),
            StreamTransport stream => stream.Stream,
            _ => throw new NotSupportedException($"TLS over {transport.GetType().Name}"),
        };
        return prefix.Length == 0 ? inner : new PrefixedStream(inner, prefix);
    }

    public override int Read(Span<byte> buffer) => TakePrefix(buffer) is var taken and > 0 ? taken : inner.Read(buffer);

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
        TakePrefix(buffer.Span) is var taken and > 0 ? new ValueTask<int>(taken) : inner.ReadAsync(buffer, cancellationToken);

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Write(ReadOnlySpan<byte> buffer) => inner.Write(buffer);

    public override void Write(byte[] buffer, int offset, int count) => inner.Write(buffer, offset, count);

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) =>
        inner.WriteAsync(buffer, cancellationToken);

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        inner.WriteAsync(buffer, offset, count, cancellationToken);

    public override void Flush() => inner.Flush();

    public override Task FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    private int TakePrefix(Span<byte> buffer)
    {
        if (_prefixPosition >= prefix.Length)
        {
            return 0;
        }

        var count = Math.Min(buffer.Length, prefix.Length - _prefixPosition);
        prefix.AsSpan(_prefixPosition, count).CopyTo(buffer);
        _prefixPosition += count;
        return count;
    }
}
