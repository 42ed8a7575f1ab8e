using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// The client against a scripted fake server, for what no real server does on demand: drops in the middle of a
/// reply, malformed replies, replies out of order, replies that never come, refusals during negotiation. Each must
/// give the caller a clear error, never a hang. These run with reconnection off (a script that ends closes the
/// connection, which a reconnecting client would answer with a new one); replay is <see cref="ReconnectTests"/>'.
/// </summary>
public sealed class ScriptedServerTests
{
    private const ulong Size = 1 << 20;
    private const TransmissionFlags Writable = TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.SendFua |
        TransmissionFlags.SendTrim | TransmissionFlags.SendWriteZeroes | TransmissionFlags.SendCache;

    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(20);

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    /// <summary>Reconnection off: a lost connection fails its requests at once (what these tests check).</summary>
    private static NbdClientOptions NoReconnect => new() { DeadConnectionTimeout = TimeSpan.Zero };

    // ---- connection lost, malformed replies ----

    [Fact]
    public async Task Server_closing_in_the_middle_of_a_read_reply_fails_every_pending_request()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (first, _) = await c.ReadRequestAsync();
            await c.ReadRequestAsync();

            // A chunk header promising 64 KiB, then only part of it, then the server is gone.
            var header = new byte[StructuredReplyHeader.Length + 8];
            StructuredReplyHeader.Write(header, ReplyFlags.Done, ReplyType.OffsetData, first.Cookie, 65536 + 8);
            BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(20), first.Offset);
            await c.SendAsync([.. header, .. new byte[1000]]);
            c.Close();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var read1 = client.ReadAsync(0, new byte[65536], Token).AsTask();
        var read2 = client.ReadAsync(65536, new byte[4096], Token).AsTask();

        var error1 = await Assert.ThrowsAsync<NbdConnectionException>(() => read1.WaitAsync(Bound, Token));
        var error2 = await Assert.ThrowsAsync<NbdConnectionException>(() => read2.WaitAsync(Bound, Token));
        Assert.Contains("READ offset 0 length 65536 failed", error1.Message, StringComparison.Ordinal);
        Assert.Contains("closed the connection", error1.Message, StringComparison.Ordinal);
        Assert.Contains("2 requests in flight failed", error1.Message, StringComparison.Ordinal);
        Assert.Contains("READ offset 65536 length 4096 failed", error2.Message, StringComparison.Ordinal);

        // Later requests fail at once with the same cause.
        var later = await Assert.ThrowsAsync<NbdConnectionException>(() => client.ReadAsync(0, new byte[512], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("no working connection", later.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Server_closing_before_replying_fails_the_request()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            await c.ReadRequestAsync();
            c.Close();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdConnectionException>(() => client.WriteAsync(0, new byte[4096], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("WRITE offset 0 length 4096 failed", error.Message, StringComparison.Ordinal);
        Assert.Contains("closed the connection while the client waited for a reply", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Server_resetting_the_connection_fails_the_request()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            await c.ReadRequestAsync();
            c.Reset();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdConnectionException>(() => client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("FLUSH", error.Message, StringComparison.Ordinal);
        Assert.Contains("lost", error.Message, StringComparison.Ordinal);
    }

    public static TheoryData<string, string> MalformedReplies => new()
    {
        { "bad-magic", "neither a simple reply" },
        { "unknown-cookie", "matches no request in flight" },
        { "data-outside-request", "outside the request" },
        { "none-without-done", "NONE chunk without the DONE flag" },
        { "not-covered", "does not cover the request" },
        { "overlapping", "overlap" },
        { "hole-size-zero", "OFFSET_HOLE chunk of size 0" },
        { "unknown-chunk-type", "unknown type 77" },
        { "extended-block-status", "extended headers were not negotiated" },
        { "data-chunk-for-write", "not a READ" },
        { "short-error-chunk", "error chunk of 3 bytes" },
    };

    [Theory]
    [MemberData(nameof(MalformedReplies))]
    public async Task Malformed_reply_is_a_protocol_error_that_ends_the_connection(string kind, string expected)
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            var cookie = request.Cookie;
            switch (kind)
            {
                case "bad-magic":
                    await c.SendAsync([0xde, 0xad, 0xbe, 0xef, .. new byte[12]]);
                    break;
                case "unknown-cookie":
                    await c.SendSimpleReplyAsync(cookie + 1000);
                    break;
                case "data-outside-request":
                    await c.SendDataChunkAsync(cookie, 8192, new byte[4096]);
                    break;
                case "none-without-done":
                    await c.SendChunkAsync(ReplyFlags.None, ReplyType.None, cookie, []);
                    break;
                case "not-covered":
                    await c.SendDataChunkAsync(cookie, 0, new byte[2048]);
                    break;
                case "overlapping":
                    await c.SendDataChunkAsync(cookie, 0, new byte[3000], done: false);
                    await c.SendDataChunkAsync(cookie, 2000, new byte[2096]);
                    break;
                case "hole-size-zero":
                    await c.SendHoleChunkAsync(cookie, 0, 0);
                    break;
                case "unknown-chunk-type":
                    await c.SendChunkAsync(ReplyFlags.Done, (ReplyType)77, cookie, []);
                    break;
                case "extended-block-status":
                    await c.SendChunkAsync(ReplyFlags.Done, ReplyType.BlockStatusExtended, cookie, new byte[24]);
                    break;
                case "data-chunk-for-write":
                    await c.SendDataChunkAsync(cookie, 0, new byte[16]);
                    break;
                case "short-error-chunk":
                    await c.SendChunkAsync(ReplyFlags.Done, ReplyType.Error, cookie, [0, 0, 5]);
                    break;
            }

            Assert.True(await c.WaitForClientCloseAsync(), "the client should hang up on a protocol violation");
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var operation = kind == "data-chunk-for-write"
            ? client.WriteAsync(0, new byte[4096], Token).AsTask()
            : client.ReadAsync(0, new byte[4096], Token).AsTask();
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => operation.WaitAsync(Bound, Token));
        Assert.Contains(expected, error.Message, StringComparison.Ordinal);
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Structured_chunk_without_structured_replies_is_a_protocol_error()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable, structured: false);
            var (request, _) = await c.ReadRequestAsync();
            await c.SendChunkAsync(ReplyFlags.Done, ReplyType.None, request.Cookie, []);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        Assert.False(client.Export.StructuredReplies);
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("structured replies were not negotiated", error.Message, StringComparison.Ordinal);
    }

    // ---- errors the connection survives ----

    [Fact]
    public async Task Error_chunk_fails_only_its_request_with_the_servers_message_and_offset()
    {
        var data = Patterns.Generate(0, 4096);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (bad, _) = await c.ReadRequestAsync();
            await c.SendDataChunkAsync(bad.Cookie, bad.Offset, new byte[512], done: false);
            await c.SendErrorChunkAsync(bad.Cookie, NbdError.IO, "disk on fire", offset: bad.Offset + 512);
            var (good, _) = await c.ReadRequestAsync();
            await c.SendDataChunkAsync(good.Cookie, good.Offset, data);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdServerErrorException>(() => client.ReadAsync(8192, new byte[4096], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Equal(NbdError.IO, error.Error);
        Assert.Equal(NbdCommand.Read, error.Command);
        Assert.Equal("disk on fire", error.ServerMessage);
        Assert.Equal(8192ul + 512, error.ErrorOffset);
        Assert.Contains("EIO", error.Message, StringComparison.Ordinal);

        var buffer = new byte[4096];
        await client.ReadAsync(0, buffer, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(data, buffer);
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Unknown_error_chunk_type_fails_the_request_and_the_connection_carries_on()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (first, _) = await c.ReadRequestAsync();
            var payload = new byte[6 + 5];
            BinaryPrimitives.WriteUInt32BigEndian(payload, 5);
            BinaryPrimitives.WriteUInt16BigEndian(payload.AsSpan(4), 5);
            "oops!"u8.CopyTo(payload.AsSpan(6));
            await c.SendChunkAsync(ReplyFlags.Done, (ReplyType)0x8005, first.Cookie, payload);
            var (second, _) = await c.ReadRequestAsync();
            await c.SendSimpleReplyAsync(second.Cookie);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdServerErrorException>(() => client.TrimAsync(0, 4096, cancellationToken: Token).AsTask().WaitAsync(Bound, Token));
        Assert.Equal(NbdError.InvalidArgument, error.Error);
        Assert.Contains("unknown error chunk type 0x8005: oops!", error.Message, StringComparison.Ordinal);
        await client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token);
        await server.WaitForScriptsAsync();
    }

    [Theory]
    [InlineData(NbdError.NotPermitted, "EPERM")]
    [InlineData(NbdError.NoSpace, "ENOSPC")]
    [InlineData((NbdError)1234, "error 1234")]
    public async Task Simple_error_reply_becomes_a_server_error(NbdError wire, string name)
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable, structured: false);
            var (request, _) = await c.ReadRequestAsync();
            await c.SendSimpleReplyAsync(request.Cookie, wire);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdServerErrorException>(() => client.WriteAsync(4096, new byte[512], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Equal(wire, error.Error);
        Assert.Contains(name, error.Message, StringComparison.Ordinal);
        Assert.Contains("WRITE at offset 4096 length 512", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Eshutdown_makes_the_client_finish_what_is_in_flight_then_disconnect()
    {
        var disc = new TaskCompletionSource<NbdCommand>(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (first, _) = await c.ReadRequestAsync();
            var (second, _) = await c.ReadRequestAsync();
            await c.SendErrorChunkAsync(first.Cookie, NbdError.Shutdown, "going down");
            await c.SendSimpleReplyAsync(second.Cookie);
            var (last, _) = await c.ReadRequestAsync();
            disc.SetResult(last.Command);
            Assert.True(await c.WaitForClientCloseAsync());
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var first = client.WriteAsync(0, new byte[512], Token).AsTask();
        var second = client.WriteAsync(512, new byte[512], Token).AsTask();
        var error = await Assert.ThrowsAsync<NbdServerErrorException>(() => first.WaitAsync(Bound, Token));
        Assert.Equal(NbdError.Shutdown, error.Error);
        await second.WaitAsync(Bound, Token);
        Assert.Equal(NbdCommand.Disconnect, await disc.Task.WaitAsync(Bound, Token));
        var refused = await Assert.ThrowsAsync<NbdConnectionException>(() => client.ReadAsync(0, new byte[512], Token).AsTask());
        Assert.Contains("is shutting down", refused.Message, StringComparison.Ordinal);
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Missing_block_status_chunk_fails_only_that_request()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            await c.SendChunkAsync(ReplyFlags.Done, ReplyType.None, request.Cookie, []);
            var (next, _) = await c.ReadRequestAsync();
            await c.SendBlockStatusChunkAsync(next.Cookie, 1, [(4096, 3), (8192, 0)]);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => client.GetBlockStatusAsync(0, 65536, cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("without a BLOCK_STATUS chunk for context 'base:allocation'", error.Message, StringComparison.Ordinal);

        var status = await client.GetBlockStatusAsync(0, 65536, cancellationToken: Token).WaitAsync(Bound, Token);
        Assert.Equal([new NbdExtent(0, 4096, 3), new NbdExtent(4096, 8192, 0)], status.Extents);
        Assert.True(status.Extents[0].IsHole && status.Extents[0].IsZero);
        Assert.Equal(12288, status.End);
    }

    [Fact]
    public async Task Block_status_for_an_unselected_context_id_is_a_protocol_error()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            await c.SendBlockStatusChunkAsync(request.Cookie, 99, [(4096, 0)]);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => client.GetBlockStatusAsync(0, 4096, cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("context id 99, which was never selected", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Block_status_breaking_req_one_is_refused()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            Assert.Equal(CommandFlags.RequestOne, request.Flags);
            await c.SendBlockStatusChunkAsync(request.Cookie, 1, [(4096, 3), (4096, 0)]);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => client.GetBlockStatusAsync(0, 65536, flags: CommandFlags.RequestOne, cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains("break the spec's rules", error.Message, StringComparison.Ordinal);
        await server.WaitForScriptsAsync();
    }

    // ---- ordering, pipelining ----

    [Fact]
    public async Task Replies_in_any_order_and_interleaved_chunks_reach_the_right_requests()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var requests = new List<NbdRequest>();
            for (var i = 0; i < 4; i++)
            {
                requests.Add((await c.ReadRequestAsync()).Request);
            }

            Assert.Equal(4, requests.Select(r => r.Cookie).Distinct().Count());

            // The last first; the first one in two chunks with another reply in between; a hole for the third.
            var byOffset = requests.OrderBy(r => r.Offset).ToList();
            await c.SendDataChunkAsync(byOffset[3].Cookie, byOffset[3].Offset, Patterns.Generate((long)byOffset[3].Offset, 4096));
            await c.SendDataChunkAsync(byOffset[0].Cookie, byOffset[0].Offset + 2048, Patterns.Generate((long)byOffset[0].Offset + 2048, 2048), done: false);
            await c.SendHoleChunkAsync(byOffset[2].Cookie, byOffset[2].Offset, 4096);
            await c.SendDataChunkAsync(byOffset[1].Cookie, byOffset[1].Offset, Patterns.Generate((long)byOffset[1].Offset, 4096));
            await c.SendDataChunkAsync(byOffset[0].Cookie, byOffset[0].Offset, Patterns.Generate((long)byOffset[0].Offset, 2048), done: false);
            await c.SendChunkAsync(ReplyFlags.Done, ReplyType.None, byOffset[0].Cookie, []);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var buffers = Enumerable.Range(0, 4).Select(_ => Enumerable.Repeat((byte)0xee, 4096).ToArray()).ToArray();
        var reads = Enumerable.Range(0, 4).Select(i => client.ReadAsync(i * 4096, buffers[i], Token).AsTask()).ToArray();
        await Task.WhenAll(reads).WaitAsync(Bound, Token);
        Assert.Equal(Patterns.Generate(0, 4096), buffers[0]);
        Assert.Equal(Patterns.Generate(4096, 4096), buffers[1]);
        Assert.Equal(new byte[4096], buffers[2]);
        Assert.Equal(Patterns.Generate(12288, 4096), buffers[3]);
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Unacknowledged_requests_are_kept_until_their_replies_arrive()
    {
        var received = new TaskCompletionSource<List<NbdRequest>>(TaskCreationOptions.RunContinuationsAsynchronously);
        var release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var requests = new List<NbdRequest>();
            for (var i = 0; i < 5; i++)
            {
                requests.Add((await c.ReadRequestAsync()).Request);
            }

            received.SetResult(requests);
            await release.Task.WaitAsync(Bound);
            foreach (var request in requests)
            {
                await c.SendSimpleReplyAsync(request.Cookie);
            }
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var writes = Enumerable.Range(0, 5).Select(i => client.WriteAsync(i * 512, new byte[512], Token).AsTask()).ToArray();
        var requests = await received.Task.WaitAsync(Bound, Token);
        Assert.Equal(5, requests.Select(r => r.Cookie).Distinct().Count());
        Assert.Equal(5, client.UnacknowledgedCount);
        release.SetResult();
        await Task.WhenAll(writes).WaitAsync(Bound, Token);
        Assert.Equal(0, client.UnacknowledgedCount);
    }

    [Fact]
    public async Task Flush_waits_for_the_replies_to_earlier_writes_before_it_is_sent()
    {
        var flushSeenEarly = false;
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (write, _) = await c.ReadRequestAsync();
            Assert.Equal(NbdCommand.Write, write.Command);

            // Nothing else may arrive while the write is unacknowledged.
            var next = c.ReadRequestAsync();
            flushSeenEarly = await Task.WhenAny(next, Task.Delay(500)) == next;
            await c.SendSimpleReplyAsync(write.Cookie);
            var (flush, _) = await next;
            Assert.Equal(NbdCommand.Flush, flush.Command);
            await c.SendSimpleReplyAsync(flush.Cookie);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var write = client.WriteAsync(0, new byte[4096], Token).AsTask();
        await client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token);
        Assert.True(write.IsCompletedSuccessfully);
        Assert.False(flushSeenEarly, "FLUSH went out before the write it must cover was acknowledged");
        await server.WaitForScriptsAsync();
    }

    // ---- timeouts, cancellation ----

    [Fact]
    public async Task Request_without_reply_times_out_and_a_late_reply_is_dropped()
    {
        var late = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (slow, _) = await c.ReadRequestAsync();
            await late.Task.WaitAsync(Bound);
            await c.SendDataChunkAsync(slow.Cookie, slow.Offset, Enumerable.Repeat((byte)0x11, 4096).ToArray());
            var (fast, _) = await c.ReadRequestAsync();
            await c.SendDataChunkAsync(fast.Cookie, fast.Offset, Enumerable.Repeat((byte)0x22, 4096).ToArray());
        });
        var options = new NbdClientOptions { DeadConnectionTimeout = TimeSpan.Zero, RequestTimeout = TimeSpan.FromMilliseconds(300) };
        await using var client = await NbdClient.ConnectAsync(server.Uri(), options, Token);
        var buffer = Enumerable.Repeat((byte)0xee, 4096).ToArray();
        var error = await Assert.ThrowsAsync<TimeoutException>(() => client.ReadAsync(0, buffer, Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("no reply from", error.Message, StringComparison.Ordinal);
        late.SetResult();

        var second = new byte[4096];
        await client.ReadAsync(4096, second, Token).AsTask().WaitAsync(Bound, Token);
        Assert.All(second, b => Assert.Equal(0x22, b));

        // The late reply was read (the stream stayed in step) but never written into the abandoned buffer.
        Assert.All(buffer, b => Assert.Equal(0xee, b));
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Cancelled_read_returns_at_once_and_its_reply_is_dropped()
    {
        var requestSeen = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var cancelled = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (read, _) = await c.ReadRequestAsync();
            requestSeen.SetResult();
            await cancelled.Task.WaitAsync(Bound);
            await c.SendDataChunkAsync(read.Cookie, read.Offset, Enumerable.Repeat((byte)0x33, 4096).ToArray());
            var (flush, _) = await c.ReadRequestAsync();
            await c.SendSimpleReplyAsync(flush.Cookie);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var buffer = Enumerable.Repeat((byte)0xee, 4096).ToArray();
        using var cancellation = new CancellationTokenSource();
        var read = client.ReadAsync(0, buffer, cancellation.Token).AsTask();
        await requestSeen.Task.WaitAsync(Bound, Token);
        await cancellation.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => read.WaitAsync(Bound, Token));
        cancelled.SetResult();
        await client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token);
        Assert.All(buffer, b => Assert.Equal(0xee, b));
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Slot_wait_is_bounded_by_the_request_timeout_when_the_server_stops_answering()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            await c.WaitForClientCloseAsync(TimeSpan.FromSeconds(15));
        });
        var options = new NbdClientOptions { DeadConnectionTimeout = TimeSpan.Zero, RequestTimeout = TimeSpan.FromMilliseconds(300), MaxRequestsInFlight = 2 };
        await using var client = await NbdClient.ConnectAsync(server.Uri(), options, Token);
        var first = client.ReadAsync(0, new byte[512], Token).AsTask();
        var second = client.ReadAsync(512, new byte[512], Token).AsTask();
        var third = client.ReadAsync(1024, new byte[512], Token).AsTask();
        await Assert.ThrowsAsync<TimeoutException>(() => first.WaitAsync(Bound, Token));
        await Assert.ThrowsAsync<TimeoutException>(() => second.WaitAsync(Bound, Token));
        var error = await Assert.ThrowsAsync<TimeoutException>(() => third.WaitAsync(Bound, Token));
        Assert.Contains("waiting for a connection or a free request slot", error.Message, StringComparison.Ordinal);
    }

    // ---- negotiation ----

    [Fact]
    public async Task Server_without_go_gets_export_name_and_its_zero_padding()
    {
        var options = new List<NbdOption>();
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.SendGreetingAsync(HandshakeFlags.FixedNewstyle);
            Assert.Equal(ClientFlags.FixedNewstyle, await c.ReadClientFlagsAsync());
            while (true)
            {
                var (option, data) = await c.ReadOptionAsync();
                options.Add(option);
                if (option == NbdOption.ExportName)
                {
                    Assert.Equal("disk", System.Text.Encoding.UTF8.GetString(data));
                    var reply = new byte[ExportNameReply.FullLength];
                    ExportNameReply.Write(reply, Size, Writable, noZeroes: false);
                    await c.SendAsync(reply);
                    break;
                }

                await c.ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported);
            }

            var (request, _) = await c.ReadRequestAsync();
            await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, Patterns.Generate(0, 512));
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri("disk"), NoReconnect, Token);
        Assert.Equal(NegotiationMethod.ExportName, client.Export.Method);
        Assert.False(client.Export.StructuredReplies);
        Assert.Equal((long)Size, client.Size);
        Assert.Equal([NbdOption.ExtendedHeaders, NbdOption.StructuredReply, NbdOption.Go, NbdOption.ExportName], options);
        var buffer = new byte[512];
        await client.ReadAsync(0, buffer, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(Patterns.Generate(0, 512), buffer);
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Plain_newstyle_server_gets_export_name_straight_away()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.SendGreetingAsync(HandshakeFlags.None);
            Assert.Equal(ClientFlags.None, await c.ReadClientFlagsAsync());
            var (option, _) = await c.ReadOptionAsync();
            Assert.Equal(NbdOption.ExportName, option);
            var reply = new byte[ExportNameReply.FullLength];
            ExportNameReply.Write(reply, Size, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly, noZeroes: false);
            await c.SendAsync(reply);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        Assert.False(client.Export.FixedNewstyle);
        Assert.True(client.Export.IsReadOnly);
        await Assert.ThrowsAsync<NotSupportedException>(() => client.WriteAsync(0, new byte[1], Token).AsTask());
    }

    [Fact]
    public async Task Export_name_refused_by_closing_is_reported_as_such()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.SendGreetingAsync(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes);
            await c.ReadClientFlagsAsync();
            var (option, _) = await c.ReadOptionAsync();
            Assert.Equal(NbdOption.ExportName, option);
            c.Close();
        });
        var options = new NbdClientOptions { UseGo = false, StructuredReplies = false };
        var error = await Assert.ThrowsAsync<NbdOptionException>(() => NbdClient.ConnectAsync(server.Uri("nope"), options, Token).WaitAsync(Bound, Token));
        Assert.Contains("closed the connection when asked for export 'nope' with NBD_OPT_EXPORT_NAME", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Refused_structured_replies_and_meta_contexts_leave_a_working_simple_client()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.SendGreetingAsync();
            await c.ReadClientFlagsAsync();
            await c.RefuseExtendedHeadersAsync();
            var (option, _) = await c.ReadOptionAsync();
            Assert.Equal(NbdOption.StructuredReply, option);
            await c.ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported, "no thanks");
            (option, _) = await c.ReadOptionAsync();
            Assert.Equal(NbdOption.Go, option);
            await c.ReplyInfoExportAsync(option, Size, Writable);
            await c.ReplyAsync(option, OptionReplyType.Ack);
            var (request, _) = await c.ReadRequestAsync();
            await c.SendSimpleReplyAsync(request.Cookie);
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        Assert.False(client.Export.StructuredReplies);
        Assert.False(client.Export.CanBlockStatus);
        var error = await Assert.ThrowsAsync<NotSupportedException>(() => client.GetBlockStatusAsync(0, 4096, cancellationToken: Token));
        Assert.Contains("block status is not available", error.Message, StringComparison.Ordinal);
        await client.WriteZeroesAsync(0, 4096, cancellationToken: Token).AsTask().WaitAsync(Bound, Token);
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Meta_contexts_refused_like_nbdkit_no_mc_leave_structured_replies_without_block_status()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.SendGreetingAsync();
            await c.ReadClientFlagsAsync();
            await c.RefuseExtendedHeadersAsync();
            var (option, _) = await c.ReadOptionAsync();
            await c.ReplyAsync(option, OptionReplyType.Ack);
            (option, _) = await c.ReadOptionAsync();
            Assert.Equal(NbdOption.SetMetaContext, option);
            await c.ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported);
            (option, _) = await c.ReadOptionAsync();
            await c.ReplyInfoExportAsync(option, Size, Writable);
            await c.ReplyAsync(option, OptionReplyType.Ack);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        Assert.True(client.Export.StructuredReplies);
        Assert.Empty(client.Export.MetaContexts);
        await Assert.ThrowsAsync<NotSupportedException>(() => client.GetBlockStatusAsync(0, 4096, cancellationToken: Token));
    }

    public static TheoryData<OptionReplyType, Type, string> GoRefusals => new()
    {
        { OptionReplyType.ErrorUnknown, typeof(NbdOptionException), "has no export named 'disk' (NBD_REP_ERR_UNKNOWN: not here)" },
        { OptionReplyType.ErrorTlsRequired, typeof(NbdTlsException), "serves export 'disk' only over TLS, or has no such export (NBD_OPT_GO answered NBD_REP_ERR_TLS_REQD: not here): use an nbds:// URI" },
        { OptionReplyType.ErrorPolicy, typeof(NbdOptionException), "refused access to export 'disk'" },
        { OptionReplyType.ErrorShutdown, typeof(NbdOptionException), "shutting down" },
        { OptionReplyType.ErrorInvalid, typeof(NbdOptionException), "refused NBD_OPT_GO with NBD_REP_ERR_INVALID: not here" },
    };

    [Theory]
    [MemberData(nameof(GoRefusals))]
    public async Task Go_refusals_are_clear_errors(OptionReplyType reply, Type exceptionType, string expected)
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.SendGreetingAsync();
            await c.ReadClientFlagsAsync();
            while (true)
            {
                var (option, _) = await c.ReadOptionAsync();
                if (option == NbdOption.Go)
                {
                    await c.ReplyErrorAsync(option, reply, "not here");
                    if (reply == OptionReplyType.ErrorShutdown)
                    {
                        // The spec: after NBD_REP_ERR_SHUTDOWN the client MUST soft-disconnect.
                        Assert.Equal(NbdOption.Abort, (await c.ReadOptionAsync()).Option);
                        await c.ReplyAsync(NbdOption.Abort, OptionReplyType.Ack);
                    }

                    break;
                }

                await c.ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported);
            }

            await c.WaitForClientCloseAsync();
        });
        var error = await Assert.ThrowsAnyAsync<NbdException>(() => NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.IsType(exceptionType, error);
        Assert.Contains(expected, error.Message, StringComparison.Ordinal);
        await server.WaitForScriptsAsync();
    }

    public static TheoryData<string, Type, string> BrokenHandshakes => new()
    {
        { "oldstyle", typeof(NbdProtocolException), "oldstyle handshake" },
        { "http", typeof(NbdProtocolException), "is not an NBD server" },
        { "close-after-greeting", typeof(NbdConnectionException), "closed the connection during the handshake" },
        { "export-info-length", typeof(NbdProtocolException), "NBD_INFO_EXPORT of 13 bytes" },
        { "block-size-invalid", typeof(NbdProtocolException), "impossible block sizes" },
        { "ack-without-export", typeof(NbdProtocolException), "without sending NBD_INFO_EXPORT" },
        { "wrong-reply-magic", typeof(NbdProtocolException), "wrong magic number" },
        { "wrong-option-echo", typeof(NbdProtocolException), "with a reply for option 3" },
        { "silent", typeof(NbdConnectionException), "did not complete the NBD handshake within 0.5 s" },
    };

    [Theory]
    [MemberData(nameof(BrokenHandshakes))]
    public async Task Broken_handshakes_are_clear_errors(string kind, Type exceptionType, string expected)
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            switch (kind)
            {
                case "oldstyle":
                    await c.SendAsync(Convert.FromHexString("4e42444d41474943" + "0000420281861253" + "0000000000100000" + "00000003" + new string('0', 248)));
                    break;
                case "http":
                    await c.SendAsync("HTTP/1.1 400 Bad Request\r\n\r\n"u8.ToArray());
                    break;
                case "close-after-greeting":
                    await c.SendGreetingAsync();
                    await c.ReadClientFlagsAsync();
                    c.Close();
                    return;
                case "silent":
                    await c.SendGreetingAsync();
                    await c.ReadClientFlagsAsync();
                    await c.WaitForClientCloseAsync();
                    return;
                default:
                    await c.SendGreetingAsync();
                    await c.ReadClientFlagsAsync();
                    while (true)
                    {
                        var (option, _) = await c.ReadOptionAsync();
                        if (option != NbdOption.Go)
                        {
                            await c.ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported);
                            continue;
                        }

                        switch (kind)
                        {
                            case "export-info-length":
                                await c.ReplyAsync(option, OptionReplyType.Info, new byte[13]);
                                break;
                            case "block-size-invalid":
                                var sizes = new byte[InfoReplies.BlockSizeLength];
                                InfoReplies.WriteBlockSize(sizes, new BlockSizeConstraints(3, 4096, 65536));
                                await c.ReplyAsync(option, OptionReplyType.Info, sizes);
                                break;
                            case "ack-without-export":
                                await c.ReplyAsync(option, OptionReplyType.Ack);
                                break;
                            case "wrong-reply-magic":
                                await c.SendAsync(new byte[20]);
                                break;
                            case "wrong-option-echo":
                                await c.ReplyAsync(NbdOption.List, OptionReplyType.Ack);
                                break;
                        }

                        break;
                    }

                    break;
            }

            await c.WaitForClientCloseAsync();
        });
        var options = new NbdClientOptions { HandshakeTimeout = TimeSpan.FromMilliseconds(500) };
        var error = await Assert.ThrowsAnyAsync<NbdException>(() => NbdClient.ConnectAsync(server.Uri(), options, Token).WaitAsync(Bound, Token));
        Assert.IsType(exceptionType, error);
        Assert.Contains(expected, error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Listing_rechecks_a_zero_info_size_with_go_as_nbd_server_3_24_needs()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.SendGreetingAsync();
            await c.ReadClientFlagsAsync();
            for (var i = 0; i < 16; i++)
            {
                var (option, data) = await c.ReadOptionAsync();
                switch (option)
                {
                    case NbdOption.List:
                        await c.ReplyAsync(option, OptionReplyType.Server, ServerReply.Create("disk", "the disk"));
                        await c.ReplyAsync(option, OptionReplyType.Server, ServerReply.Create("empty", null));
                        await c.ReplyAsync(option, OptionReplyType.Ack);
                        break;
                    case NbdOption.Info:
                        // nbd-server 3.24: INFO reports size 0 before the export is opened.
                        await c.ReplyInfoExportAsync(option, 0, Writable);
                        await c.ReplyAsync(option, OptionReplyType.Ack);
                        break;
                    case NbdOption.Go:
                        Assert.True(InfoRequest.TryParse(data, out var request, out _));
                        await c.ReplyInfoExportAsync(option, request!.ExportName == "disk" ? Size : 0, Writable);
                        await c.ReplyAsync(option, OptionReplyType.Ack);
                        await c.WaitForClientCloseAsync();
                        return;
                    case NbdOption.Abort:
                        // Like nbd-server: close without the ACK the spec asks for.
                        c.Close();
                        return;
                    default:
                        await c.ReplyErrorAsync(option, OptionReplyType.ErrorUnsupported);
                        break;
                }
            }
        });
        var listings = await NbdClient.ListExportsAsync(NbdUri.Parse(server.Uri()), cancellationToken: Token).WaitAsync(Bound, Token);
        Assert.Equal(["disk", "empty"], listings.Select(l => l.Name));
        Assert.Equal("the disk", listings[0].Description);
        Assert.Equal((long)Size, listings[0].Info!.Size);
        Assert.Equal(0, listings[1].Info!.Size);
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Multi_conn_opens_several_connections_that_must_agree()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            // The third connection describes the export differently (smaller): the client must refuse to mix them.
            await c.HandshakeAsync(c.Number == 3 ? Size / 2 : Size, Writable | TransmissionFlags.CanMultiConn);
            await c.WaitForClientCloseAsync();
        });
        var options = new NbdClientOptions { Connections = 3 };
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => NbdClient.ConnectAsync(server.Uri(), options, Token).WaitAsync(Bound, Token));
        Assert.Contains("differently", error.Message, StringComparison.Ordinal);
        Assert.Equal(3, server.ConnectionCount);
    }

    [Fact]
    public async Task Without_multi_conn_only_one_connection_is_opened()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            await c.WaitForClientCloseAsync();
        });
        var options = new NbdClientOptions { Connections = 4 };
        await using var client = await NbdClient.ConnectAsync(server.Uri(), options, Token);
        Assert.Equal(1, client.ConnectionCount);
        Assert.Equal(1, server.ConnectionCount);
    }

    [Fact]
    public async Task Disconnect_waits_for_replies_then_sends_disc()
    {
        var disc = new TaskCompletionSource<NbdRequest>(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (write, _) = await c.ReadRequestAsync();
            await Task.Delay(200);
            await c.SendSimpleReplyAsync(write.Cookie);
            var (request, _) = await c.ReadRequestAsync();
            disc.SetResult(request);
            Assert.True(await c.WaitForClientCloseAsync());
        });
        var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var pending = client.WriteAsync(0, new byte[512], Token).AsTask();
        await client.DisposeAsync();
        Assert.True(pending.IsCompletedSuccessfully);
        var request = await disc.Task.WaitAsync(Bound, Token);
        Assert.Equal(NbdCommand.Disconnect, request.Command);
        await Assert.ThrowsAsync<ObjectDisposedException>(() => client.ReadAsync(0, new byte[1], Token).AsTask());
        await server.WaitForScriptsAsync();
    }
}
