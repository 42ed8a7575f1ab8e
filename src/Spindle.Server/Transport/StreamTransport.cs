using System.Net;

namespace Spindle.Server.Transport;

/// <summary>
/// A transport over any duplex <see cref="Stream"/>: a TLS stream after STARTTLS, or an in-memory stream in tests.
/// Gathered sends are written segment by segment and then flushed.
/// </summary>
public sealed class StreamTransport : ConnectionTransport
{
    private readonly Stream _stream;
    private readonly Action? _abort;

    public StreamTransport(Stream stream, string remoteDescription, IPEndPoint? remoteEndPoint = null, Action? abort = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        _stream = stream;
        RemoteDescription = remoteDescription;
        RemoteIPEndPoint = remoteEndPoint;
        _abort = abort;
    }

    public Stream Stream => _stream;

    public override string RemoteDescription { get; }

    public override IPEndPoint? RemoteIPEndPoint { get; }

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken) =>
        _stream.ReadAsync(buffer, cancellationToken);

    public override async ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        await _stream.WriteAsync(buffer, cancellationToken).ConfigureAwait(false);
        await _stream.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    public override async ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(buffers);
        for (var i = 0; i < buffers.Count; i++)
        {
            await _stream.WriteAsync(buffers[i].AsMemory(), cancellationToken).ConfigureAwait(false);
        }

        await _stream.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    public override void Abort()
    {
        _abort?.Invoke();
        _stream.Dispose();
    }

    public override async ValueTask DisposeAsync()
    {
        await _stream.DisposeAsync().ConfigureAwait(false);
    }
}
