using System.Net;

namespace Spindle.Wire;

/// <summary>
/// A transport over any duplex <see cref="Stream"/>: an in-memory stream in tests (<see cref="InMemoryDuplex"/>), or
/// a pipe. Gathered sends are written segment by segment and then flushed.
/// </summary>
public sealed class StreamTransport : Transport
{
    private readonly Stream _stream;
    private readonly Action? _abort;

    /// <param name="stream">The stream; the transport owns it.</param>
    /// <param name="remoteDescription">How to name the peer in logs and messages.</param>
    /// <param name="remoteEndPoint">The peer's address for access rules, if it has one.</param>
    /// <param name="abort">Called by <see cref="Abort"/> before the stream is disposed.</param>
    public StreamTransport(Stream stream, string remoteDescription, IPEndPoint? remoteEndPoint = null, Action? abort = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        _stream = stream;
        RemoteDescription = remoteDescription;
        RemoteIPEndPoint = remoteEndPoint;
        _abort = abort;
    }

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

    public override ValueTask DisposeAsync() => _stream.DisposeAsync();

    protected internal override Stream OpenStream() => _stream;
}
