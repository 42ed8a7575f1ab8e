using System.Net;
using System.Net.Sockets;
using Spindle.Wire;

namespace Spindle.Client.Connection;

/// <summary>Opens the socket an <see cref="NbdUri"/> names.</summary>
internal static class TransportConnector
{
    public static async Task<Transport> ConnectAsync(NbdUri uri, TimeSpan timeout, CancellationToken cancellationToken)
    {
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (timeout != Timeout.InfiniteTimeSpan)
        {
            deadline.CancelAfter(timeout);
        }

        try
        {
            return uri.Transport == NbdTransportKind.Unix
                ? await ConnectUnixAsync(uri, deadline.Token).ConfigureAwait(false)
                : await ConnectTcpAsync(uri, deadline.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new NbdConnectionException($"cannot connect to {uri.Target}: no answer within {timeout.TotalSeconds:0.#} s");
        }
    }

    private static async Task<Transport> ConnectUnixAsync(NbdUri uri, CancellationToken cancellationToken)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(uri.SocketPath!), cancellationToken).ConfigureAwait(false);
            return new SocketTransport(socket, blocking: false, description: uri.Target);
        }
        catch (SocketException exception)
        {
            socket.Dispose();
            throw new NbdConnectionException($"cannot connect to {uri.Target}: {Reason(exception)}", exception);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    private static async Task<Transport> ConnectTcpAsync(NbdUri uri, CancellationToken cancellationToken)
    {
        IPAddress[] addresses;
        if (IPAddress.TryParse(uri.Host, out var literal))
        {
            addresses = [literal];
        }
        else
        {
            try
            {
                addresses = await Dns.GetHostAddressesAsync(uri.Host!, cancellationToken).ConfigureAwait(false);
            }
            catch (SocketException exception)
            {
                throw new NbdConnectionException($"cannot resolve host '{uri.Host}': {exception.Message}", exception);
            }

            if (addresses.Length == 0)
            {
                throw new NbdConnectionException($"cannot resolve host '{uri.Host}': no addresses");
            }
        }

        SocketException? last = null;
        foreach (var address in addresses)
        {
            var socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                // proto.md: both sides SHOULD disable Nagle; requests are small and latency-bound.
                socket.NoDelay = true;
                EnableKeepAlive(socket);
                await socket.ConnectAsync(new IPEndPoint(address, uri.Port), cancellationToken).ConfigureAwait(false);
                return new SocketTransport(socket, blocking: false, description: uri.Target);
            }
            catch (SocketException exception)
            {
                socket.Dispose();
                last = exception;
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        }

        throw new NbdConnectionException($"cannot connect to {uri.Target}: {Reason(last!)}", last!);
    }

    /// <summary>
    /// TCP keepalive: a peer whose machine vanished (power cut, network partition: no FIN, no RST) is detected on an
    /// idle connection in about 15 + 4 x 5 seconds, so a reconnecting client notices without a request timing out.
    /// Keepalive probes are answered by the peer's kernel, so a slow but live server is never mistaken for a dead one.
    /// </summary>
    private static void EnableKeepAlive(Socket socket)
    {
        try
        {
            socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, 15);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, 5);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, 4);
        }
        catch (SocketException)
        {
            // A platform without these options: the reply timeout still detects a dead peer.
        }
    }

    private static string Reason(SocketException exception) => exception.SocketErrorCode switch
    {
        SocketError.ConnectionRefused => "connection refused (is the server running and listening there?)",
        SocketError.AddressNotAvailable or SocketError.HostUnreachable or SocketError.NetworkUnreachable => exception.Message,
        _ => exception.Message,
    };
}
