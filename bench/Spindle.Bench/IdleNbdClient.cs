using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Spindle.Protocol;

namespace Spindle.Bench;

/// <summary>
/// The least a client does to hold a connection in transmission: fixed newstyle, NO_ZEROES, NBD_OPT_GO for one export
/// with no information requests, then nothing until <see cref="DisconnectAsync"/>. The idle-connections measurement
/// opens a thousand of these.
/// </summary>
internal sealed class IdleNbdClient : IAsyncDisposable
{
    /// <summary>Replies to NBD_OPT_GO read at most: INFO replies come first, one per item, then ACK (proto.md, "NBD_OPT_GO").</summary>
    private const int MaxReplies = 64;

    /// <summary>The longest reply payload read: an INFO is a few bytes, a description at most 4 KiB plus its header.</summary>
    private const int MaxReplyLength = 64 * 1024;

    private readonly Socket _socket;

    private IdleNbdClient(Socket socket) => _socket = socket;

    /// <summary>Connects and negotiates to transmission; throws with the reason when the server refuses.</summary>
    public static async Task<IdleNbdClient> ConnectAsync(int port, string exportName, CancellationToken cancellationToken)
    {
        var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            await socket.ConnectAsync(new IPEndPoint(IPAddress.Loopback, port), cancellationToken);
            await NegotiateAsync(socket, exportName, cancellationToken);
            return new IdleNbdClient(socket);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    private static async Task NegotiateAsync(Socket socket, string exportName, CancellationToken cancellationToken)
    {
        // Server greeting (proto.md, "Fixed newstyle negotiation"): "NBDMAGIC" "IHAVEOPT" u16 handshake flags.
        var greeting = new byte[ServerGreeting.Length];
        await ReceiveExactlyAsync(socket, greeting, cancellationToken);
        if (ServerGreeting.TryRead(greeting, out var offered, out var oldstyle) != ParseStatus.Done)
        {
            throw new InvalidDataException(oldstyle ? "the server speaks oldstyle" : "not an NBD server greeting");
        }

        if (!offered.HasFlag(HandshakeFlags.FixedNewstyle))
        {
            throw new InvalidDataException("the server does not offer fixed newstyle");
        }

        // Client flags (u32), then NBD_OPT_GO: u32 name length, name, u16 number of information requests (0).
        var name = System.Text.Encoding.UTF8.GetBytes(exportName);
        var message = new byte[4 + OptionHeader.Length + 4 + name.Length + 2];
        var flags = ClientFlags.FixedNewstyle | (offered.HasFlag(HandshakeFlags.NoZeroes) ? ClientFlags.NoZeroes : ClientFlags.None);
        BinaryPrimitives.WriteUInt32BigEndian(message, (uint)flags);
        OptionHeader.Write(message.AsSpan(4), NbdOption.Go, (uint)(4 + name.Length + 2));
        BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(4 + OptionHeader.Length), (uint)name.Length);
        name.CopyTo(message.AsSpan(4 + OptionHeader.Length + 4));
        await socket.SendAsync(message, cancellationToken);

        var header = new byte[OptionReplyHeader.Length];
        for (var reply = 0; reply < MaxReplies; reply++)
        {
            await ReceiveExactlyAsync(socket, header, cancellationToken);
            if (OptionReplyHeader.TryRead(header, out var parsed) != ParseStatus.Done)
            {
                throw new InvalidDataException("bad option reply magic");
            }

            if (parsed.Option != NbdOption.Go || parsed.DataLength > MaxReplyLength)
            {
                throw new InvalidDataException($"option reply for {parsed.Option} with {parsed.DataLength} bytes");
            }

            var payload = new byte[parsed.DataLength];
            await ReceiveExactlyAsync(socket, payload, cancellationToken);
            if (parsed.IsError)
            {
                throw new InvalidDataException($"NBD_OPT_GO refused: {parsed.Type} {System.Text.Encoding.UTF8.GetString(payload)}");
            }

            if (parsed.Type == OptionReplyType.Ack)
            {
                return;
            }
        }

        throw new InvalidDataException($"no ACK to NBD_OPT_GO after {MaxReplies} replies");
    }

    /// <summary>
    /// Sends NBD_CMD_DISC (a 28-byte request, proto.md "NBD_CMD_DISC"), so the server sees a clean end rather than a
    /// dropped connection, and closes the socket.
    /// </summary>
    public async Task DisconnectAsync(CancellationToken cancellationToken)
    {
        var request = new byte[NbdLimits.RequestHeaderLength];
        BinaryPrimitives.WriteUInt32BigEndian(request, NbdMagic.RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(request.AsSpan(6), (ushort)NbdCommand.Disconnect);
        try
        {
            await _socket.SendAsync(request, cancellationToken);
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
            // The server already closed it: nothing more to say.
        }
    }

    public ValueTask DisposeAsync()
    {
        _socket.Dispose();
        return ValueTask.CompletedTask;
    }

    private static async Task ReceiveExactlyAsync(Socket socket, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        while (buffer.Length > 0)
        {
            var read = await socket.ReceiveAsync(buffer, cancellationToken);
            if (read == 0)
            {
                throw new EndOfStreamException("the server closed the connection during negotiation");
            }

            buffer = buffer[read..];
        }
    }
}
