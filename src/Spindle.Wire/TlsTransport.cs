using System.Net;
using System.Net.Security;
using System.Runtime.CompilerServices;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;

namespace Spindle.Wire;

/// <summary>
/// TLS over another transport, after NBD_OPT_STARTTLS was acknowledged: TLS is a transport swap (the connection's
/// transport is replaced by this one, the receive buffer follows). Blocking when the transport underneath is: reads
/// and writes are then synchronous <see cref="SslStream"/> calls. A gathered send is coalesced into one staging
/// buffer so a batch of small messages becomes few TLS records; large segments go straight through.
/// </summary>
public sealed class TlsTransport : Transport
{
    private const int StagingSize = 64 * 1024;

    private readonly Transport _inner;
    private readonly SslStream _tls;
    private byte[]? _staging;

    private TlsTransport(Transport inner, SslStream tls)
    {
        _inner = inner;
        _tls = tls;
    }

    public override string RemoteDescription => _inner.RemoteDescription;

    public override IPEndPoint? RemoteIPEndPoint => _inner.RemoteIPEndPoint;

    internal override bool IsBlocking => _inner.IsBlocking;

    /// <summary>The negotiated TLS version.</summary>
    public SslProtocols Protocol => _tls.SslProtocol;

    /// <summary>The negotiated protocol and cipher suite, for logs.</summary>
    public string Summary => $"{_tls.SslProtocol}, {_tls.NegotiatedCipherSuite}";

    /// <summary>The certificate the peer presented, if any.</summary>
    public X509Certificate? RemoteCertificate => _tls.RemoteCertificate;

    /// <summary>
    /// The server side of the handshake over <paramref name="inner"/>. <paramref name="alreadyReceived"/> are bytes the
    /// NBD layer had buffered past the STARTTLS option (a client that sent its ClientHello without waiting for the
    /// acknowledgement): TLS reads them first. On failure the caller still owns <paramref name="inner"/>.
    /// </summary>
    public static async Task<TlsTransport> AuthenticateAsServerAsync(Transport inner, ReadOnlyMemory<byte> alreadyReceived,
        SslServerAuthenticationOptions options, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(inner);
        var plain = inner.OpenStream();
        var tls = new SslStream(alreadyReceived.IsEmpty ? plain : new PrefixedStream(plain, alreadyReceived.ToArray()), leaveInnerStreamOpen: true);
        try
        {
            if (inner.IsBlocking)
            {
                tls.AuthenticateAsServer(options);
            }
            else
            {
                await tls.AuthenticateAsServerAsync(options, cancellationToken).ConfigureAwait(false);
            }

            return new TlsTransport(inner, tls);
        }
        catch
        {
            await tls.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>The client side of the handshake over <paramref name="inner"/>. On failure the caller still owns it.</summary>
    public static async Task<TlsTransport> AuthenticateAsClientAsync(Transport inner, SslClientAuthenticationOptions options, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(inner);
        var tls = new SslStream(inner.OpenStream(), leaveInnerStreamOpen: true);
        try
        {
            if (inner.IsBlocking)
            {
                tls.AuthenticateAsClient(options);
            }
            else
            {
                await tls.AuthenticateAsClientAsync(options, cancellationToken).ConfigureAwait(false);
            }

            return new TlsTransport(inner, tls);
        }
        catch
        {
            await tls.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

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

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
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
            // close_notify first, so the peer can tell a clean end from a cut connection.
            if (IsBlocking)
            {
                _tls.ShutdownAsync().GetAwaiter().GetResult();
            }
            else
            {
                await _tls.ShutdownAsync().ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is IOException or ObjectDisposedException or InvalidOperationException or NotSupportedException)
        {
        }

        await _inner.ShutdownSendAsync().ConfigureAwait(false);
    }

    public override void Abort() => _inner.Abort();

    public override Task RunAsync(Func<Task> connection, string name) => _inner.RunAsync(connection, name);

    public override ValueTask ReaderWaitAsync(ValueTask pending) => _inner.ReaderWaitAsync(pending);

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
        if (Interlocked.Exchange(ref _staging, null) is { } staging)
        {
            BufferPool.Shared.Return(staging);
        }
    }

    protected internal override Stream OpenStream() => _tls;

    private ValueTask FlushStagingAsync(byte[] staging, int used, CancellationToken cancellationToken) =>
        used == 0 ? ValueTask.CompletedTask : SendAsync(staging.AsMemory(0, used), cancellationToken);
}
