using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using Microsoft.Extensions.Logging;
using Spindle.Cli.Hosting.Native;

namespace Spindle.Cli.Hosting.Control;

/// <summary>
/// The control socket of <c>spindle ctl</c>: a Unix stream socket, mode 0600 and owned by the service user, and each
/// peer checked with SO_PEERCRED: only root and the user the server runs as are answered. One request per connection:
/// a JSON object on one line, answered by one JSON object on one line (<see cref="ControlProtocol"/>).
/// </summary>
internal sealed class ControlServer : IAsyncDisposable
{
    private const int SolSocket = 1;
    private const int SoPeerCred = 17;

    /// <summary>A request larger than this is refused (the largest real one, an add with every key, is a few hundred bytes).</summary>
    private const int MaxRequestBytes = 64 * 1024;

    private readonly Socket _socket;
    private readonly string _path;
    private readonly ServerHost _host;
    private readonly ILogger _logger;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;

    private ControlServer(Socket socket, string path, ServerHost host, ILogger logger)
    {
        _socket = socket;
        _path = path;
        _host = host;
        _logger = logger;
        _loop = Task.Run(AcceptLoopAsync);
    }

    /// <summary>Binds the socket; with a privilege drop ahead, hands it to that user so it stays usable after.</summary>
    public static ControlServer Start(string path, ServerHost host, PrivilegeDrop? drop, ILogger logger)
    {
        var full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        if (File.Exists(full))
        {
            using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                probe.Connect(new UnixDomainSocketEndPoint(full));
                throw new IOException($"another server already answers on the control socket {full}");
            }
            catch (SocketException)
            {
                File.Delete(full);
            }
        }

        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(full));
            if (!OperatingSystem.IsWindows())
            {
                File.SetUnixFileMode(full, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            }

            if (drop is not null && Posix.chown(full, drop.Uid, drop.Gid) != 0)
            {
                throw new IOException($"cannot give the control socket {full} to {drop.UserName}: {Posix.LastError()}");
            }

            socket.Listen(16);
        }
        catch (SocketException exception)
        {
            socket.Dispose();
            throw new IOException($"cannot listen on the control socket {full}: {exception.Message}", exception);
        }
        catch
        {
            socket.Dispose();
            throw;
        }

        ControlLog.Listening(logger, full);
        return new ControlServer(socket, full, host, logger);
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        _socket.Dispose();
        try
        {
            await _loop.ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
        }

        try
        {
            File.Delete(_path);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
        }

        _stop.Dispose();
    }

    private async Task AcceptLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await _socket.AcceptAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (Exception exception) when (exception is OperationCanceledException or ObjectDisposedException)
            {
                return;
            }
            catch (SocketException)
            {
                await Task.Delay(10).ConfigureAwait(false);
                continue;
            }

            _ = Task.Run(() => AnswerAsync(client));
        }
    }

    private async Task AnswerAsync(Socket client)
    {
        using var _ = client;
        using var stream = new NetworkStream(client, ownsSocket: false);
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
        timeout.CancelAfter(TimeSpan.FromSeconds(30));
        string answer;
        try
        {
            // The request is read (bounded in size and time) even from a peer that is refused: closing a Unix socket
            // with its request unread resets the connection, and the peer would see ECONNRESET instead of the refusal.
            var uid = PeerUid(client);
            var line = await ReadLineAsync(stream, timeout.Token).ConfigureAwait(false);
            if (uid != 0 && uid != Posix.geteuid())
            {
                ControlLog.Refused(_logger, uid);
                answer = ControlProtocol.Error($"uid {uid} may not use this control socket (only root and the server's user)");
            }
            else
            {
                answer = line is null ? ControlProtocol.Error($"a request is one JSON line of at most {MaxRequestBytes} bytes") : await DispatchAsync(line).ConfigureAwait(false);
            }

            await stream.WriteAsync(Encoding.UTF8.GetBytes(answer + "\n"), timeout.Token).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is IOException or SocketException or OperationCanceledException or ObjectDisposedException)
        {
            ControlLog.ClientFailed(_logger, exception.Message);
        }
    }

    private async Task<string> DispatchAsync(string line)
    {
        ControlRequest request;
        try
        {
            request = ControlProtocol.ParseRequest(line);
        }
        catch (FormatException exception)
        {
            return ControlProtocol.Error(exception.Message);
        }

        ControlLog.Request(_logger, request.Command);
        switch (request.Command)
        {
            case "status":
                return ControlProtocol.Answer(_host.WriteStatus);
            case "exports":
                return ControlProtocol.Answer(_host.WriteExports);
            case "connections":
                return ControlProtocol.Answer(_host.WriteConnections);
            case "reload":
                return ControlProtocol.From(await _host.ReloadAsync("spindle ctl reload").ConfigureAwait(false));
            case "add":
                return ControlProtocol.From(await _host.AddAsync(request.Name!, request.Settings).ConfigureAwait(false));
            case "change":
                return ControlProtocol.From(await _host.ChangeAsync(request.Name!, request.Settings).ConfigureAwait(false));
            case "remove":
                return ControlProtocol.From(await _host.RemoveAsync(request.Name!).ConfigureAwait(false));
            case "disconnect":
                return ControlProtocol.From(_host.Disconnect(request.Id!.Value));
            default:
                return ControlProtocol.Error($"unknown command '{request.Command}'");
        }
    }

    /// <summary>SO_PEERCRED: struct ucred { pid_t pid; uid_t uid; gid_t gid; } of the connecting process.</summary>
    private static uint PeerUid(Socket client)
    {
        Span<byte> credentials = stackalloc byte[12];
        var length = client.GetRawSocketOption(SolSocket, SoPeerCred, credentials);
        if (length < 12)
        {
            throw new IOException("SO_PEERCRED gave no credentials");
        }

        return BinaryPrimitives.ReadUInt32LittleEndian(credentials[4..]);
    }

    private static async Task<string?> ReadLineAsync(Stream stream, CancellationToken cancellationToken)
    {
        var buffer = new byte[MaxRequestBytes];
        var count = 0;
        while (count < buffer.Length)
        {
            var read = await stream.ReadAsync(buffer.AsMemory(count), cancellationToken).ConfigureAwait(false);
            if (read == 0)
            {
                break;
            }

            var newline = Array.IndexOf(buffer, (byte)'\n', count, read);
            count += read;
            if (newline >= 0)
            {
                return Encoding.UTF8.GetString(buffer, 0, newline);
            }
        }

        return count > 0 && count < buffer.Length ? Encoding.UTF8.GetString(buffer, 0, count) : null;
    }
}

internal static partial class ControlLog
{
    [LoggerMessage(EventId = 400, Level = LogLevel.Information, Message = "Control socket at {Path} (spindle ctl --socket {Path})")]
    public static partial void Listening(ILogger logger, string path);

    [LoggerMessage(EventId = 401, Level = LogLevel.Warning, Message = "Control socket: refused a client running as uid {Uid}")]
    public static partial void Refused(ILogger logger, uint uid);

    [LoggerMessage(EventId = 402, Level = LogLevel.Debug, Message = "Control socket: a client failed: {Reason}")]
    public static partial void ClientFailed(ILogger logger, string reason);

    [LoggerMessage(EventId = 403, Level = LogLevel.Information, Message = "Control socket: {Command}")]
    public static partial void Request(ILogger logger, string command);
}
