using System.Net.Security;
using System.Runtime.CompilerServices;

namespace Spindle.Client.Transport;

/// <summary>
/// TLS over a connected socket, after NBD_OPT_STARTTLS was acknowledged. One read and one write may run at the same
/// time, as <see cref="SslStream"/> allows. A gathered send (request headers and write payloads) is coalesced into
/// one staging buffer so that a batch of small requests becomes few TLS records; large payloads go straight through.
/// </summary>
internal sealed class TlsTransport : NbdTransport
{
    private const int StagingSize = 64 * 1024;

    private readonly NbdTransport _inner;
    private readonly SslStream _tls;
    private readonly byte[] _staging = GC.AllocateUninitializedArray<byte>(StagingSize);

    public TlsTransport(NbdTransport inner, SslStream tls)
    {
        _inner = inner;
        _tls = tls;
    }

    public override string Description => _inner.Description;

    /// <summary>The negotiated protocol and cipher suite, for logs.</summary>
    public string Summary => $"{_tls.SslProtocol}, {_tls.NegotiatedCipherSuite}";

    public override Stream AsStream() => _tls;

    public override ValueTask<int> ReceiveAsync(Memory<byte> buffer, CancellationToken cancellationToken) =>
        _tls.ReadAsync(buffer, cancellationToken);

    public override ValueTask SendAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken) =>
        _tls.WriteAsync(buffer, cancellationToken);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public override async ValueTask SendAsync(IList<ArraySegment<byte>> buffers, CancellationToken cancellationToken)
    {
        var used = 0;
        for (var i = 0; i < buffers.Count; i++)
        {
            var segment = buffers[i];
            if (segment.Count > StagingSize / 4)
            {
                if (used > 0)
                {
                    await _tls.WriteAsync(_staging.AsMemory(0, used), cancellationToken).ConfigureAwait(false);
                    used = 0;
                }

                await _tls.WriteAsync(segment.AsMemory(), cancellationToken).ConfigureAwait(false);
                continue;
            }

            if (used + segment.Count > StagingSize)
            {
                await _tls.WriteAsync(_staging.AsMemory(0, used), cancellationToken).ConfigureAwait(false);
                used = 0;
            }

            segment.AsSpan().CopyTo(_staging.AsSpan(used));
            used += segment.Count;
        }

        if (used > 0)
        {
            await _tls.WriteAsync(_staging.AsMemory(0, used), cancellationToken).ConfigureAwait(false);
        }
    }

    public override async ValueTask ShutdownSendAsync()
    {
        try
        {
            // close_notify first, so the server can tell a clean end from a cut connection.
            await _tls.ShutdownAsync().ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is IOException or ObjectDisposedException or InvalidOperationException or NotSupportedException)
        {
        }

        await _inner.ShutdownSendAsync().ConfigureAwait(false);
    }

    public override void Abort() => _inner.Abort();

    public override async ValueTask DisposeAsync()
    {
        try
        {
            await _tls.DisposeAsync().ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is IOException or ObjectDisposedException)
        {
        }

        await _inner.DisposeAsync().ConfigureAwait(false);
    }
}
