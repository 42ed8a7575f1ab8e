using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Spindle.Server.Logging;

namespace Spindle.Server;

/// <summary>
/// Accepts connections on one endpoint (TCP or Unix socket). Accept errors are sorted: a transient shortage of
/// descriptors or memory backs off and retries, a connection that died before being accepted is skipped, and only
/// closing the listener ends the loop.
/// </summary>
internal sealed class ConnectionListener : IAsyncDisposable
{
    private const int SolSocket = 1;
    private const int SoReuseAddr = 2;

    private readonly Socket _socket;
    private readonly NbdServer _server;
    private readonly ILogger _logger;
    private readonly CancellationTokenSource _stop = new();
    private readonly string? _unixPath;
    private Task _acceptLoop = Task.CompletedTask;

    private ConnectionListener(Socket socket, NbdServer server, ListenEndpoint endpoint, string? unixPath)
    {
        _socket = socket;
        _server = server;
        _logger = server.Logger;
        _unixPath = unixPath;
        Endpoint = endpoint;
        LocalEndPoint = socket.LocalEndPoint!;
    }

    /// <summary>The endpoint as configured.</summary>
    public ListenEndpoint Endpoint { get; }

    /// <summary>The endpoint actually bound (port 0 resolved).</summary>
    public EndPoint LocalEndPoint { get; }

    public string Display => LocalEndPoint is UnixDomainSocketEndPoint ? "unix:" + (_unixPath ?? LocalEndPoint.ToString()) : LocalEndPoint.ToString()!;

    public static ConnectionListener Bind(ListenEndpoint endpoint, NbdServer server) => endpoint switch
    {
        ListenEndpoint.Tcp tcp => BindTcp(tcp, server),
        ListenEndpoint.Unix unix => BindUnix(unix, server),
        ListenEndpoint.Inherited inherited => Adopt(inherited, server),
        _ => throw new ArgumentException($"unsupported endpoint {endpoint}", nameof(endpoint)),
    };

    public void Start()
    {
        _acceptLoop = Task.Run(AcceptLoopAsync);
        ServerLog.Listening(_logger, Display);
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        _socket.Dispose();
        try
        {
            await _acceptLoop.ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
        }

        if (_unixPath is not null)
        {
            TryDelete(_unixPath);
        }

        ServerLog.StoppedListening(_logger, Display);
        _stop.Dispose();
    }

    private static ConnectionListener BindTcp(ListenEndpoint.Tcp tcp, NbdServer server)
    {
        var socket = new Socket(tcp.Address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            if (tcp.Address.Equals(IPAddress.IPv6Any))
            {
                // [::] with IPV6_V6ONLY off takes IPv4 clients too (as ::ffff:a.b.c.d).
                socket.DualMode = true;
            }

            // Rebinding right after a restart must not fail on connections in TIME_WAIT: SO_REUSEADDR, set raw,
            // because .NET's ReuseAddress also sets SO_REUSEPORT on Linux, which would let a second server bind the
            // same port and silently share the clients.
            socket.SetRawSocketOption(SolSocket, SoReuseAddr, BitConverter.GetBytes(1));
            socket.Bind(new IPEndPoint(tcp.Address, tcp.Port));
            socket.Listen(512);
            return new ConnectionListener(socket, server, tcp, null);
        }
        catch (SocketException exception) when (tcp.Address.Equals(IPAddress.IPv6Any) && exception.SocketErrorCode is SocketError.AddressFamilyNotSupported or SocketError.AddressNotAvailable)
        {
            // No IPv6 on this host: fall back to every IPv4 address.
            socket.Dispose();
            return BindTcp(new ListenEndpoint.Tcp(IPAddress.Any, tcp.Port), server);
        }
        catch (SocketException exception)
        {
            socket.Dispose();
            throw new IOException($"cannot listen on {tcp}: {exception.Message}", exception);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>A socket passed in already bound (systemd); one not listening yet is made to.</summary>
    private static ConnectionListener Adopt(ListenEndpoint.Inherited inherited, NbdServer server)
    {
        var socket = inherited.Socket;
        if (socket.SocketType != SocketType.Stream)
        {
            throw new IOException($"{inherited.Name}: the inherited socket is not a stream socket (the .socket unit needs ListenStream=)");
        }

        try
        {
            socket.Listen(512);
        }
        catch (SocketException exception)
        {
            throw new IOException($"cannot listen on {inherited}: {exception.Message}", exception);
        }

        return new ConnectionListener(socket, server, inherited, null);
    }

    private static ConnectionListener BindUnix(ListenEndpoint.Unix unix, NbdServer server)
    {
        var path = Path.GetFullPath(unix.Path);
        RemoveStaleSocket(path);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(path));
            socket.Listen(512);
            return new ConnectionListener(socket, server, unix, path);
        }
        catch (SocketException exception)
        {
            socket.Dispose();
            throw new IOException($"cannot listen on unix socket {path}: {exception.Message}", exception);
        }
    }

    /// <summary>A socket file left by a server that died is removed; one a live server still listens on is an error.</summary>
    private static void RemoveStaleSocket(string path)
    {
        if (!File.Exists(path))
        {
            return;
        }

        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException)
        {
            File.Delete(path);
            return;
        }

        throw new IOException($"another server is already listening on unix socket {path}");
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    private async Task AcceptLoopAsync()
    {
        var token = _stop.Token;
        var failures = 0;
        while (!token.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await _socket.AcceptAsync(token).ConfigureAwait(false);
                failures = 0;
            }
            catch (OperationCanceledException)
            {
                return;
            }
            catch (ObjectDisposedException)
            {
                return;
            }
            catch (SocketException exception) when (exception.SocketErrorCode is SocketError.ConnectionAborted or SocketError.ConnectionReset)
            {
                // The client gave up before we accepted it.
                continue;
            }
            catch (SocketException exception)
            {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM...: back off (up to a second) and keep serving existing clients.
                failures++;
                ServerLog.AcceptFailed(_logger, Display, exception.Message);
                try
                {
                    await Task.Delay(Math.Min(1000, 10 * failures), token).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    return;
                }

                continue;
            }

            if (client.AddressFamily is AddressFamily.InterNetwork or AddressFamily.InterNetworkV6)
            {
                client.NoDelay = true;
            }

            _server.Accept(client);
        }
    }
}
