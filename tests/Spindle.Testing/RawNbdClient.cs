using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Spindle.Protocol;
using Xunit;

namespace Spindle.Testing;

/// <summary>One reply read by <see cref="RawNbdClient.ReadReplyAsync"/>: a simple reply or one structured chunk.</summary>
public sealed record RawReply(bool IsStructured, ulong Cookie, NbdError Error, ReplyFlags Flags, ReplyType Type, byte[] Payload, ulong? ExtendedOffset = null)
{
    public bool IsDone => !IsStructured || (Flags & ReplyFlags.Done) != 0;

    /// <summary>For an ERROR or ERROR_OFFSET chunk, the error it carries.</summary>
    public NbdError ChunkError => IsStructured && ((ushort)Type & 0x8000) != 0 ? (NbdError)BinaryPrimitives.ReadUInt32BigEndian(Payload) : NbdError.None;

    /// <summary>The error of the reply, simple or structured.</summary>
    public NbdError AnyError => IsStructured ? ChunkError : Error;

    public string ErrorMessage => IsStructured && StructuredReplyChunks.TryReadError(Payload, Type, out _, out var message, out _) ? message : string.Empty;
}

/// <summary>
/// A byte-level NBD client for tests: it sends exactly what it is told, including malformed messages, and reads
/// replies without interpreting more than asked. Every read has a deadline so a test never hangs.
/// </summary>
public sealed class RawNbdClient : IAsyncDisposable
{
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(15);

    private readonly Stream _stream;
    private readonly Socket? _socket;

    public RawNbdClient(Stream stream, Socket? socket = null)
    {
        _stream = stream;
        _socket = socket;
    }

    public TimeSpan Timeout { get; set; } = DefaultTimeout;

    public static async Task<RawNbdClient> ConnectAsync(IPEndPoint endpoint)
    {
        var socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        await socket.ConnectAsync(endpoint);
        return new RawNbdClient(new NetworkStream(socket, ownsSocket: true), socket);
    }

    public static async Task<RawNbdClient> ConnectUnixAsync(string path)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(path));
        return new RawNbdClient(new NetworkStream(socket, ownsSocket: true), socket);
    }

    // ---- handshake ----

    public async Task<HandshakeFlags> ReadGreetingAsync()
    {
        var bytes = await ReadExactlyAsync(ServerGreeting.Length);
        Assert.Equal(ParseStatus.Done, ServerGreeting.TryRead(bytes, out var flags, out _));
        return flags;
    }

    public Task SendClientFlagsAsync(ClientFlags flags)
    {
        var bytes = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, (uint)flags);
        return SendRawAsync(bytes);
    }

    /// <summary>Greeting plus client flags (fixed newstyle, no zeroes).</summary>
    public async Task StartAsync(ClientFlags flags = ClientFlags.FixedNewstyle | ClientFlags.NoZeroes)
    {
        var greeting = await ReadGreetingAsync();
        Assert.Equal(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes, greeting);
        await SendClientFlagsAsync(flags);
    }

    public Task SendOptionAsync(NbdOption option, ReadOnlySpan<byte> data = default) => SendOptionAsync(option, (uint)data.Length, data.ToArray());

    /// <summary>Sends an option header with a chosen length (which may lie about the data that follows).</summary>
    public Task SendOptionAsync(NbdOption option, uint declaredLength, byte[] data)
    {
        var bytes = new byte[OptionHeader.Length + data.Length];
        OptionHeader.Write(bytes, option, declaredLength);
        data.CopyTo(bytes, OptionHeader.Length);
        return SendRawAsync(bytes);
    }

    public async Task<(OptionReplyHeader Header, byte[] Data)> ReadOptionReplyAsync()
    {
        var header = await ReadExactlyAsync(OptionReplyHeader.Length);
        Assert.Equal(ParseStatus.Done, OptionReplyHeader.TryRead(header, out var reply));
        var data = await ReadExactlyAsync((int)reply.DataLength);
        return (reply, data);
    }

    /// <summary>Reads replies to <paramref name="option"/> up to and including the final one (ACK or an error).</summary>
    public async Task<List<(OptionReplyHeader Header, byte[] Data)>> ReadOptionRepliesAsync(NbdOption option)
    {
        var replies = new List<(OptionReplyHeader, byte[])>();
        for (var i = 0; i < 100_000; i++)
        {
            var reply = await ReadOptionReplyAsync();
            Assert.Equal(option, reply.Header.Option);
            replies.Add(reply);
            if (reply.Header.Type == OptionReplyType.Ack || reply.Header.IsError)
            {
                return replies;
            }
        }

        Assert.Fail("no final option reply after 100000 replies");
        return replies;
    }

    /// <summary>Negotiates the usual way (structured replies, base:allocation, GO) and returns the export's size and flags.</summary>
    /// <remarks>With <paramref name="start"/> false the greeting was already handled (for example before STARTTLS).</remarks>
    /// <remarks>With <paramref name="extended"/> it asks for extended headers instead of structured replies.</remarks>
    public async Task<(ulong Size, TransmissionFlags Flags)> NegotiateAsync(string export = "", bool structured = true, bool blockStatus = true, bool start = true, bool extended = false)
    {
        if (start)
        {
            await StartAsync();
        }

        if (structured || extended)
        {
            await SendOptionAsync(extended ? NbdOption.ExtendedHeaders : NbdOption.StructuredReply);
            Assert.Equal(OptionReplyType.Ack, (await ReadOptionReplyAsync()).Header.Type);
            if (blockStatus)
            {
                await SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest(export, [MetaContexts.BaseAllocation]).ToBytes());
                var contexts = await ReadOptionRepliesAsync(NbdOption.SetMetaContext);
                Assert.Equal(OptionReplyType.Ack, contexts[^1].Header.Type);
            }
        }

        await SendOptionAsync(NbdOption.Go, new InfoRequest(export, [InfoType.BlockSize]).ToBytes());
        var replies = await ReadOptionRepliesAsync(NbdOption.Go);
        Assert.Equal(OptionReplyType.Ack, replies[^1].Header.Type);
        var info = replies.Single(r => r.Header.Type == OptionReplyType.Info && InfoReplies.TryReadType(r.Data, out var type) && type == InfoType.Export);
        Assert.True(InfoReplies.TryReadExport(info.Data, out var size, out var flags));
        return (size, flags);
    }

    // ---- transmission ----

    public Task SendRequestAsync(NbdCommand command, ulong cookie, ulong offset, uint length, CommandFlags flags = CommandFlags.None, byte[]? payload = null)
    {
        var bytes = new byte[NbdLimits.RequestHeaderLength + (payload?.Length ?? 0)];
        new NbdRequest(flags, command, cookie, offset, length).WriteTo(bytes);
        payload?.CopyTo(bytes, NbdLimits.RequestHeaderLength);
        return SendRawAsync(bytes);
    }

    /// <summary>Sends a 32-byte extended request (extended headers negotiated) with an optional payload.</summary>
    public Task SendExtendedRequestAsync(NbdCommand command, ulong cookie, ulong offset, ulong length, CommandFlags flags = CommandFlags.None, byte[]? payload = null)
    {
        var bytes = new byte[NbdLimits.ExtendedRequestHeaderLength + (payload?.Length ?? 0)];
        new NbdRequest(flags, command, cookie, offset, length, extended: true).WriteTo(bytes);
        payload?.CopyTo(bytes, NbdLimits.ExtendedRequestHeaderLength);
        return SendRawAsync(bytes);
    }

    /// <summary>Reads one reply: a simple reply (followed by <paramref name="simpleReadLength"/> bytes of data if it reports success) or one structured chunk.</summary>
    public async Task<RawReply> ReadReplyAsync(int simpleReadLength = 0)
    {
        var magicBytes = await ReadExactlyAsync(4);
        var magic = BinaryPrimitives.ReadUInt32BigEndian(magicBytes);
        if (magic == NbdMagic.SimpleReplyMagic)
        {
            var rest = await ReadExactlyAsync(12);
            var error = (NbdError)BinaryPrimitives.ReadUInt32BigEndian(rest);
            var cookie = BinaryPrimitives.ReadUInt64BigEndian(rest.AsSpan(4));
            var data = error == NbdError.None && simpleReadLength > 0 ? await ReadExactlyAsync(simpleReadLength) : [];
            return new RawReply(false, cookie, error, ReplyFlags.Done, ReplyType.None, data);
        }

        if (magic == NbdMagic.ExtendedReplyMagic)
        {
            var extended = await ReadExactlyAsync(ExtendedReplyHeader.Length - 4);
            var payloadLength = BinaryPrimitives.ReadUInt64BigEndian(extended.AsSpan(20));
            Assert.True(payloadLength < 64 * 1024 * 1024, $"extended chunk of {payloadLength} bytes");
            return new RawReply(true, BinaryPrimitives.ReadUInt64BigEndian(extended.AsSpan(4)), NbdError.None,
                (ReplyFlags)BinaryPrimitives.ReadUInt16BigEndian(extended), (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(extended.AsSpan(2)),
                await ReadExactlyAsync((int)payloadLength), BinaryPrimitives.ReadUInt64BigEndian(extended.AsSpan(12)));
        }

        Assert.True(magic == NbdMagic.StructuredReplyMagic, $"unexpected reply magic 0x{magic:x8}");
        var header = await ReadExactlyAsync(16);
        var flags = (ReplyFlags)BinaryPrimitives.ReadUInt16BigEndian(header);
        var type = (ReplyType)BinaryPrimitives.ReadUInt16BigEndian(header.AsSpan(2));
        var chunkCookie = BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(4));
        var length = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(12));
        var payload = await ReadExactlyAsync(checked((int)length));
        return new RawReply(true, chunkCookie, NbdError.None, flags, type, payload);
    }

    /// <summary>Reads the chunks of one structured reply up to DONE (all must carry <paramref name="cookie"/>).</summary>
    public async Task<List<RawReply>> ReadStructuredReplyAsync(ulong cookie)
    {
        var chunks = new List<RawReply>();
        for (var i = 0; i < 1_000_000; i++)
        {
            var chunk = await ReadReplyAsync();
            Assert.Equal(cookie, chunk.Cookie);
            chunks.Add(chunk);
            if (chunk.IsDone)
            {
                return chunks;
            }
        }

        Assert.Fail("no DONE chunk");
        return chunks;
    }

    /// <summary>Reassembles a structured READ reply into the bytes it describes (holes as zeroes); fails on an error chunk.</summary>
    public static byte[] Reassemble(IReadOnlyList<RawReply> chunks, ulong offset, int length)
    {
        var data = new byte[length];
        var covered = new bool[length];
        foreach (var chunk in chunks)
        {
            switch (chunk.Type)
            {
                case ReplyType.OffsetData:
                    {
                        var at = (long)(BinaryPrimitives.ReadUInt64BigEndian(chunk.Payload) - offset);
                        var bytes = chunk.Payload.AsSpan(8);
                        Assert.InRange(at, 0, length - bytes.Length);
                        bytes.CopyTo(data.AsSpan((int)at));
                        MarkCovered(covered, (int)at, bytes.Length);
                        break;
                    }

                case ReplyType.OffsetHole:
                    {
                        var at = (long)(BinaryPrimitives.ReadUInt64BigEndian(chunk.Payload) - offset);
                        var size = BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(8));
                        Assert.Equal(12, chunk.Payload.Length);
                        Assert.InRange(at, 0, length - size);
                        MarkCovered(covered, (int)at, (int)size);
                        break;
                    }

                case ReplyType.None:
                    Assert.Empty(chunk.Payload);
                    break;
                default:
                    Assert.Fail($"unexpected chunk {chunk.Type} (error {chunk.ChunkError}: {chunk.ErrorMessage})");
                    break;
            }
        }

        Assert.All(covered, c => Assert.True(c, "READ reply does not cover the whole request"));
        return data;
    }

    private static void MarkCovered(bool[] covered, int at, int count)
    {
        for (var i = at; i < at + count; i++)
        {
            Assert.False(covered[i], $"byte {i} described twice");
            covered[i] = true;
        }
    }

    // ---- raw I/O ----

    public async Task SendRawAsync(byte[] bytes)
    {
        using var cancellation = new CancellationTokenSource(Timeout);
        await _stream.WriteAsync(bytes, cancellation.Token);
        await _stream.FlushAsync(cancellation.Token);
    }

    public async Task<byte[]> ReadExactlyAsync(int count)
    {
        var buffer = new byte[count];
        using var cancellation = new CancellationTokenSource(Timeout);
        try
        {
            await _stream.ReadExactlyAsync(buffer, cancellation.Token);
        }
        catch (OperationCanceledException)
        {
            Assert.Fail($"server sent nothing more within {Timeout.TotalSeconds} s (waiting for {count} bytes)");
        }

        return buffer;
    }

    /// <summary>True if the server closes the connection (end of stream or reset) within the timeout, reading and discarding anything before.</summary>
    public async Task<bool> WaitForCloseAsync(TimeSpan? timeout = null)
    {
        var buffer = new byte[4096];
        using var cancellation = new CancellationTokenSource(timeout ?? Timeout);
        try
        {
            while (true)
            {
                if (await _stream.ReadAsync(buffer, cancellation.Token) == 0)
                {
                    return true;
                }
            }
        }
        catch (OperationCanceledException)
        {
            return false;
        }
        catch (IOException)
        {
            return true;
        }
    }

    /// <summary>Closes the sending side only (the server sees end of stream).</summary>
    public void ShutdownSend() => _socket?.Shutdown(SocketShutdown.Send);

    public async ValueTask DisposeAsync() => await _stream.DisposeAsync();
}
