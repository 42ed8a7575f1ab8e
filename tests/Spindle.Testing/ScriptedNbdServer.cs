using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Spindle.Protocol;
using Xunit;

namespace Spindle.Testing;

/// <summary>
/// A fake NBD server for the cases no real server produces on demand (a drop in the middle of a reply, a malformed
/// chunk, a reply that never comes): each accepted connection runs a script that speaks bytes exactly as told.
/// Listens on 127.0.0.1 with a kernel-chosen port. Every read has a deadline, so a script never hangs a test.
/// </summary>
public sealed class ScriptedNbdServer : IAsyncDisposable
{
    private readonly Socket _listener;
    private readonly Func<ScriptedConnection, Task> _script;
    private readonly CancellationTokenSource _stop = new();
    private readonly List<Task> _connections = [];
    private readonly Lock _lock = new();
    private readonly Task _acceptLoop;

    private ScriptedNbdServer(Func<ScriptedConnection, Task> script)
    {
        _script = script;
        _listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        _listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        _listener.Listen(16);
        Port = ((IPEndPoint)_listener.LocalEndPoint!).Port;
        _acceptLoop = AcceptAsync();
    }

    public int Port { get; }

    /// <summary>Exceptions thrown by scripts (assertion failures included), reported when the server is disposed.</summary>
    public List<Exception> ScriptFailures { get; } = [];

    /// <summary>Connections accepted so far.</summary>
    public int ConnectionCount { get; private set; }

    public string Uri(string export = "") => $"nbd://127.0.0.1:{Port}/{System.Uri.EscapeDataString(export)}";

    /// <summary>Starts a server that runs <paramref name="script"/> on every connection.</summary>
    public static ScriptedNbdServer Start(Func<ScriptedConnection, Task> script) => new(script);

    /// <summary>Waits (bounded) until every script has finished, then rethrows the first script failure.</summary>
    public async Task WaitForScriptsAsync(TimeSpan? timeout = null)
    {
        Task[] running;
        lock (_lock)
        {
            running = [.. _connections];
        }

        await Task.WhenAll(running).WaitAsync(timeout ?? TimeSpan.FromSeconds(30));
        lock (_lock)
        {
            if (ScriptFailures.Count > 0)
            {
                throw new InvalidOperationException("a server script failed", ScriptFailures[0]);
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        _listener.Dispose();
        try
        {
            await _acceptLoop.WaitAsync(TimeSpan.FromSeconds(10));
        }
        catch (Exception exception) when (exception is OperationCanceledException or SocketException or ObjectDisposedException or TimeoutException)
        {
        }

        Task[] running;
        lock (_lock)
        {
            running = [.. _connections];
        }

        try
        {
            await Task.WhenAll(running).WaitAsync(TimeSpan.FromSeconds(10));
        }
        catch (Exception exception) when (exception is TimeoutException or OperationCanceledException)
        {
        }

        _stop.Dispose();
    }

    private async Task AcceptAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await _listener.AcceptAsync(_stop.Token);
            }
            catch (Exception exception) when (exception is OperationCanceledException or SocketException or ObjectDisposedException)
            {
                return;
            }

            socket.NoDelay = true;
            lock (_lock)
            {
                ConnectionCount++;
                _connections.Add(RunAsync(new ScriptedConnection(socket, ConnectionCount, _stop.Token)));
            }
        }
    }

    private async Task RunAsync(ScriptedConnection connection)
    {
        await using (connection)
        {
            try
            {
                await _script(connection);
            }
            catch (Exception exception) when (connection.ClientGone(exception))
            {
                // The client hung up: what the script was waiting for will never come, which is the test's business.
            }
            catch (Exception exception)
            {
                lock (_lock)
                {
                    ScriptFailures.Add(exception);
                }
            }
        }
    }
}

/// <summary>One connection of a <see cref="ScriptedNbdServer"/>: byte-level helpers for the server side.</summary>
public sealed class ScriptedConnection : IAsyncDisposable
{
    public static readonly TimeSpan ReadTimeout = TimeSpan.FromSeconds(15);

    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly CancellationToken _stop;

    internal ScriptedConnection(Socket socket, int number, CancellationToken stop)
    {
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
        Number = number;
        _stop = stop;
    }

    /// <summary>1 for the first connection the server accepted, 2 for the next...</summary>
    public int Number { get; }

    // ---- handshake ----

    public Task SendGreetingAsync(HandshakeFlags flags = HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes)
    {
        var bytes = new byte[ServerGreeting.Length];
        ServerGreeting.Write(bytes, flags);
        return SendAsync(bytes);
    }

    public async Task<ClientFlags> ReadClientFlagsAsync() =>
        (ClientFlags)BinaryPrimitives.ReadUInt32BigEndian(await ReadExactlyAsync(4));

    public async Task<(NbdOption Option, byte[] Data)> ReadOptionAsync()
    {
        var header = await ReadExactlyAsync(OptionHeader.Length);
        Assert.Equal(ParseStatus.Done, OptionHeader.TryRead(header, out var option));
        return (option.Option, await ReadExactlyAsync(checked((int)option.DataLength)));
    }

    public Task ReplyAsync(NbdOption option, OptionReplyType type, byte[]? data = null)
    {
        data ??= [];
        var bytes = new byte[OptionReplyHeader.Length + data.Length];
        OptionReplyHeader.Write(bytes, option, type, (uint)data.Length);
        data.CopyTo(bytes, OptionReplyHeader.Length);
        return SendAsync(bytes);
    }

    /// <summary>Answers the client's NBD_OPT_EXTENDED_HEADERS as a server without the extension does (ERR_UNSUP).</summary>
    public async Task RefuseExtendedHeadersAsync()
    {
        var (option, _) = await ReadOptionAsync();
        Assert.Equal(NbdOption.ExtendedHeaders, option);
        await ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported);
    }

    public Task ReplyErrorAsync(NbdOption option, OptionReplyType type, string message = "") =>
        ReplyAsync(option, type, System.Text.Encoding.UTF8.GetBytes(message));

    public Task ReplyInfoExportAsync(NbdOption option, ulong size, TransmissionFlags flags)
    {
        var info = new byte[InfoReplies.ExportLength];
        InfoReplies.WriteExport(info, size, flags);
        return ReplyAsync(option, OptionReplyType.Info, info);
    }

    /// <summary>
    /// Serves a usual negotiation until the client enters transmission (GO or EXPORT_NAME): structured replies if
    /// <paramref name="structured"/>, <paramref name="contexts"/> for SET_META_CONTEXT (id = index + 1), and the
    /// given size and flags. Returns the options the client sent, in order.
    /// </summary>
    /// <remarks>With <paramref name="extended"/> it acknowledges NBD_OPT_EXTENDED_HEADERS, and later requests and replies are extended.</remarks>
    public async Task<List<NbdOption>> HandshakeAsync(ulong size, TransmissionFlags flags, bool structured = true, string[]? contexts = null, BlockSizeConstraints? blockSizes = null, bool extended = false)
    {
        contexts ??= [MetaContexts.BaseAllocation];
        var seen = new List<NbdOption>();
        await SendGreetingAsync();
        var clientFlags = await ReadClientFlagsAsync();
        Assert.Equal(ClientFlags.FixedNewstyle | ClientFlags.NoZeroes, clientFlags);
        for (var i = 0; i < 32; i++)
        {
            var (option, data) = await ReadOptionAsync();
            seen.Add(option);
            switch (option)
            {
                case NbdOption.StructuredReply:
                    await (structured ? ReplyAsync(option, OptionReplyType.Ack) : ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported));
                    break;
                case NbdOption.ExtendedHeaders when extended:
                    Extended = true;
                    await ReplyAsync(option, OptionReplyType.Ack);
                    break;
                case NbdOption.SetMetaContext or NbdOption.ListMetaContext:
                    Assert.True(MetaContextRequest.TryParse(data, out var request, out _));
                    for (var c = 0; c < contexts.Length; c++)
                    {
                        if (option == NbdOption.ListMetaContext || request!.Queries.Contains(contexts[c]))
                        {
                            await ReplyAsync(option, OptionReplyType.MetaContext, MetaContextReply.Create((uint)(c + 1), contexts[c]));
                        }
                    }

                    await ReplyAsync(option, OptionReplyType.Ack);
                    break;
                case NbdOption.Go or NbdOption.Info:
                    await ReplyInfoExportAsync(option, size, flags);
                    if (blockSizes is { } sizes)
                    {
                        var info = new byte[InfoReplies.BlockSizeLength];
                        InfoReplies.WriteBlockSize(info, sizes);
                        await ReplyAsync(option, OptionReplyType.Info, info);
                    }

                    await ReplyAsync(option, OptionReplyType.Ack);
                    if (option == NbdOption.Go)
                    {
                        return seen;
                    }

                    break;
                case NbdOption.ExportName:
                    var reply = new byte[ExportNameReply.ShortLength];
                    ExportNameReply.Write(reply, size, flags, noZeroes: true);
                    await SendAsync(reply);
                    return seen;
                default:
                    await ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported);
                    break;
            }
        }

        Assert.Fail("the client sent more than 32 options");
        return seen;
    }

    // ---- transmission ----

    /// <summary>True once the handshake acknowledged extended headers: requests are then read as extended ones.</summary>
    public bool Extended { get; set; }

    /// <summary>Reads one request header (compact, or extended after <see cref="Extended"/>) and its payload.</summary>
    public async Task<(NbdRequest Request, byte[] Payload)> ReadRequestAsync()
    {
        var header = await ReadExactlyAsync(NbdRequest.HeaderLengthFor(Extended));
        Assert.Equal(ParseStatus.Done, NbdRequest.TryRead(header, Extended, out var request));
        var payload = request.HasPayload ? await ReadExactlyAsync(checked((int)request.WirePayloadLength)) : [];
        return (request, payload);
    }

    /// <summary>An extended reply chunk (32-byte header) echoing <paramref name="offset"/>.</summary>
    public Task SendExtendedChunkAsync(ReplyFlags flags, ReplyType type, ulong cookie, ulong offset, byte[] payload)
    {
        var bytes = new byte[ExtendedReplyHeader.Length + payload.Length];
        ExtendedReplyHeader.Write(bytes, flags, type, cookie, offset, (ulong)payload.Length);
        payload.CopyTo(bytes, ExtendedReplyHeader.Length);
        return SendAsync(bytes);
    }

    /// <summary>A BLOCK_STATUS_EXT chunk: context id, count, then (u64 length, u64 status) descriptors.</summary>
    public Task SendExtendedBlockStatusAsync(in NbdRequest request, uint contextId, (ulong Length, ulong Status)[] extents, bool done = true, uint? count = null)
    {
        var payload = new byte[8 + (16 * extents.Length)];
        BinaryPrimitives.WriteUInt32BigEndian(payload, contextId);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(4), count ?? (uint)extents.Length);
        for (var i = 0; i < extents.Length; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(payload.AsSpan(8 + (16 * i)), extents[i].Length);
            BinaryPrimitives.WriteUInt64BigEndian(payload.AsSpan(16 + (16 * i)), extents[i].Status);
        }

        return SendExtendedChunkAsync(done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.BlockStatusExtended, request.Cookie, request.Offset, payload);
    }

    public Task SendSimpleReplyAsync(ulong cookie, NbdError error = NbdError.None, byte[]? data = null)
    {
        var bytes = new byte[SimpleReply.Length + (data?.Length ?? 0)];
        SimpleReply.Write(bytes, error, cookie);
        data?.CopyTo(bytes, SimpleReply.Length);
        return SendAsync(bytes);
    }

    public Task SendChunkAsync(ReplyFlags flags, ReplyType type, ulong cookie, byte[] payload)
    {
        var bytes = new byte[StructuredReplyHeader.Length + payload.Length];
        StructuredReplyHeader.Write(bytes, flags, type, cookie, (uint)payload.Length);
        payload.CopyTo(bytes, StructuredReplyHeader.Length);
        return SendAsync(bytes);
    }

    /// <summary>An OFFSET_DATA chunk: the absolute offset then the data.</summary>
    public Task SendDataChunkAsync(ulong cookie, ulong offset, byte[] data, bool done = true)
    {
        var payload = new byte[8 + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(payload, offset);
        data.CopyTo(payload, 8);
        return SendChunkAsync(done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.OffsetData, cookie, payload);
    }

    public Task SendHoleChunkAsync(ulong cookie, ulong offset, uint size, bool done = true)
    {
        var payload = new byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(payload, offset);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(8), size);
        return SendChunkAsync(done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.OffsetHole, cookie, payload);
    }

    public Task SendErrorChunkAsync(ulong cookie, NbdError error, string message, ulong? offset = null, bool done = true)
    {
        var bytes = new byte[StructuredReplyChunks.ErrorOffsetLength(message)];
        var flags = done ? ReplyFlags.Done : ReplyFlags.None;
        var length = offset is { } at
            ? StructuredReplyChunks.WriteErrorOffset(bytes, flags, cookie, error, message, at)
            : StructuredReplyChunks.WriteError(bytes, flags, cookie, error, message);
        return SendAsync(bytes.AsSpan(0, length).ToArray());
    }

    public Task SendBlockStatusChunkAsync(ulong cookie, uint contextId, (uint Length, uint Flags)[] extents, bool done = true)
    {
        var payload = new byte[4 + (8 * extents.Length)];
        BinaryPrimitives.WriteUInt32BigEndian(payload, contextId);
        for (var i = 0; i < extents.Length; i++)
        {
            BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(4 + (8 * i)), extents[i].Length);
            BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(8 + (8 * i)), extents[i].Flags);
        }

        return SendChunkAsync(done ? ReplyFlags.Done : ReplyFlags.None, ReplyType.BlockStatus, cookie, payload);
    }

    // ---- raw I/O ----

    public async Task SendAsync(byte[] bytes)
    {
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stop);
        deadline.CancelAfter(ReadTimeout);
        await _stream.WriteAsync(bytes, deadline.Token);
        await _stream.FlushAsync(deadline.Token);
    }

    public async Task<byte[]> ReadExactlyAsync(int count)
    {
        var buffer = new byte[count];
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stop);
        deadline.CancelAfter(ReadTimeout);
        await _stream.ReadExactlyAsync(buffer, deadline.Token);
        return buffer;
    }

    /// <summary>True if the client closes the connection (end of stream or reset) within the timeout.</summary>
    public async Task<bool> WaitForClientCloseAsync(TimeSpan? timeout = null)
    {
        var buffer = new byte[4096];
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stop);
        deadline.CancelAfter(timeout ?? ReadTimeout);
        try
        {
            while (await _stream.ReadAsync(buffer, deadline.Token) > 0)
            {
            }

            return true;
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

    /// <summary>True if the client sends nothing within <paramref name="window"/> (nothing is consumed).</summary>
    public bool NothingArrivesWithin(TimeSpan window) => !_socket.Poll(window, SelectMode.SelectRead);

    /// <summary>Closes the connection at once with a reset (what a crashed server looks like).</summary>
    public void Reset()
    {
        try
        {
            _socket.LingerState = new LingerOption(true, 0);
        }
        catch (SocketException)
        {
        }

        _stream.Dispose();
    }

    /// <summary>Closes the connection cleanly (FIN): the client sees end of stream.</summary>
    public void Close() => _stream.Dispose();

    public ValueTask DisposeAsync() => _stream.DisposeAsync();

    internal bool ClientGone(Exception exception) => exception is EndOfStreamException or IOException or ObjectDisposedException or SocketException;
}
