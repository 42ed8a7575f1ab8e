using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Spindle.Client.Connection;
using Spindle.Client.Negotiation;
using Spindle.Protocol;
using Spindle.Wire;

namespace Spindle.Client;

/// <summary>
/// Negotiates a connection that someone else will carry in transmission: the Linux nbd driver, which takes a
/// connected socket (NBD_CMD_CONNECT / RECONFIGURE) and from then on reads and writes it itself. The negotiation
/// therefore asks for nothing the kernel cannot speak: no structured replies, no extended headers, no metadata
/// contexts (the kernel reads simple replies only, ../shared/nbd-protocol.md section 13), only NBD_OPT_GO with the
/// export's block sizes and, on request, its stable names. TLS cannot be handed over: an nbds URI is refused.
/// </summary>
/// <remarks>
/// The socket is opened and negotiated with blocking system calls only, so .NET never registers it with its epoll
/// thread: once the kernel owns the connection, no event of it wakes this process.
/// </remarks>
public static class NbdHandoff
{
    /// <summary>Connects to <paramref name="uri"/> (TCP or a Unix socket) and negotiates <paramref name="uri"/>'s export.</summary>
    public static async Task<NbdHandoffSocket> ConnectAsync(NbdUri uri, NbdClientOptions options, ILogger? logger, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(uri);
        ArgumentNullException.ThrowIfNull(options);
        if (uri.RequiresTls)
        {
            throw new NbdConnectionException($"{uri.Target}: a TLS connection cannot be handed to the kernel (use the relay)");
        }

        var socket = await OpenAsync(uri, options.ConnectTimeout, cancellationToken).ConfigureAwait(false);
        try
        {
            return await NegotiateAsync(socket, uri.ExportName, uri.Target, options, logger, cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Negotiates <paramref name="exportName"/> over an already connected stream socket (one end of a socket pair
    /// whose other end an in-process server serves). On failure the socket is left to the caller.
    /// </summary>
    public static async Task<NbdHandoffSocket> NegotiateAsync(Socket socket, string exportName, string description, NbdClientOptions options,
        ILogger? logger, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(socket);
        ArgumentNullException.ThrowIfNull(options);
        var kernelOptions = new NbdClientOptions
        {
            StructuredReplies = false,
            ExtendedHeaders = false,
            UseGo = true,
            DiscoverIdentity = options.DiscoverIdentity,
            HandshakeTimeout = options.HandshakeTimeout,
            MaxPayload = options.MaxPayload,
        };
        kernelOptions.MetaContexts.Clear();
        var transport = new SocketTransport(socket, blocking: true, description: description);
        using var receive = new ReceiveBuffer(transport, ReceiveBufferOptions.Client);
        var negotiator = new ClientNegotiator(transport, receive, logger ?? NullLogger.Instance);
        var export = await NbdConnection.HandshakeAsync(negotiator, kernelOptions.HandshakeTimeout,
            (negotiator, token) => NbdConnection.NegotiateAsync(negotiator, exportName, kernelOptions, tls: null, token), cancellationToken).ConfigureAwait(false);
        if (receive.Count != 0)
        {
            // Nothing may follow the answer to GO until the first request: these bytes would reach the kernel.
            throw new NbdProtocolException($"{description} sent {receive.Count} bytes after the handshake");
        }

        return new NbdHandoffSocket(socket, export);
    }

    private static async Task<Socket> OpenAsync(NbdUri uri, TimeSpan timeout, CancellationToken cancellationToken)
    {
        EndPoint endPoint;
        Socket socket;
        if (uri.Transport == NbdTransportKind.Unix)
        {
            endPoint = new UnixDomainSocketEndPoint(uri.SocketPath!);
            socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        }
        else
        {
            IPAddress address;
            if (!IPAddress.TryParse(uri.Host, out address!))
            {
                IPAddress[] addresses;
                try
                {
                    addresses = await Dns.GetHostAddressesAsync(uri.Host!, cancellationToken).ConfigureAwait(false);
                }
                catch (SocketException exception)
                {
                    throw new NbdConnectionException($"cannot resolve host '{uri.Host}': {exception.Message}", exception);
                }

                address = addresses.FirstOrDefault() ?? throw new NbdConnectionException($"cannot resolve host '{uri.Host}': no addresses");
            }

            endPoint = new IPEndPoint(address, uri.Port);
            socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            // Keepalive: the kernel holds this socket for as long as the device lives; a vanished server machine is
            // then noticed on an idle device too (15 s idle, 4 probes 5 s apart).
            socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, 15);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, 5);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, 4);
        }

        // A blocking connect on a pool thread (an asynchronous one would register the socket with epoll); a socket
        // that does not connect in time is closed, which ends the wait.
        var connect = Task.Run(() => socket.Connect(endPoint), CancellationToken.None);
        try
        {
            await connect.WaitAsync(timeout, cancellationToken).ConfigureAwait(false);
            return socket;
        }
        catch (Exception exception) when (exception is TimeoutException or OperationCanceledException or SocketException)
        {
            socket.Dispose();
            await Task.WhenAny(connect).ConfigureAwait(false);
            if (exception is OperationCanceledException)
            {
                throw;
            }

            throw exception is SocketException socketException
                ? new NbdConnectionException($"cannot connect to {uri.Target}: {socketException.Message}", socketException)
                : new NbdConnectionException($"cannot connect to {uri.Target}: no answer within {timeout.TotalSeconds:0.#} s");
        }
    }
}

/// <summary>
/// A connected socket in NBD transmission with the export it negotiated, ready to be handed to the kernel. Keep
/// the object for as long as the kernel uses the socket: disposing it (or letting it be finalized) may reset the
/// connection under the kernel. Dispose it once the kernel has let the socket go.
/// </summary>
public sealed class NbdHandoffSocket : IDisposable
{
    internal NbdHandoffSocket(Socket socket, ExportInfo export)
    {
        Socket = socket;
        Export = export;
    }

    public Socket Socket { get; }

    public ExportInfo Export { get; }

    /// <summary>The descriptor to hand over (NBD_SOCK_FD).</summary>
    public int Descriptor => (int)Socket.SafeHandle.DangerousGetHandle();

    /// <summary>
    /// Ends a negotiated connection the kernel did not take: NBD_CMD_DISC first, so the server sees a clean
    /// disconnect rather than a lost client, then close.
    /// </summary>
    public void Disconnect()
    {
        Span<byte> request = stackalloc byte[NbdLimits.RequestHeaderLength];
        request.Clear();
        BinaryPrimitives.WriteUInt32BigEndian(request, NbdMagic.RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(request[6..], (ushort)NbdCommand.Disconnect);
        try
        {
            Socket.Send(request);
            Socket.Shutdown(SocketShutdown.Send);
        }
        catch (Exception exception) when (exception is SocketException or ObjectDisposedException)
        {
            // The server is gone already: closing is all that is left.
        }

        Dispose();
    }

    public void Dispose() => Socket.Dispose();
}
