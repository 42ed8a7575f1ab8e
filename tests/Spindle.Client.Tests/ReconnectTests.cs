using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// Reconnection and replay against a scripted server that drops connections at chosen points: in the middle of a
/// request, in the middle of a reply, between a write and its flush. The caller sees no error, the server sees every
/// unanswered request again (and nothing already answered), and a FLUSH only after every write before it is
/// acknowledged.
/// </summary>
public sealed class ReconnectTests
{
    private const ulong Size = 1 << 20;
    private const TransmissionFlags Writable = TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.SendFua |
        TransmissionFlags.SendTrim | TransmissionFlags.SendWriteZeroes;

    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    /// <summary>Reconnect quickly (the tests' servers come back at once).</summary>
    private static NbdClientOptions Fast(TimeSpan? deadTimeout = null) => new()
    {
        ReconnectDelay = TimeSpan.FromMilliseconds(10),
        MaxReconnectDelay = TimeSpan.FromMilliseconds(100),
        DeadConnectionTimeout = deadTimeout ?? TimeSpan.FromSeconds(60),
    };

    /// <summary>The server reads this much of a 64 KiB WRITE (28-byte header, then the payload) and dies.</summary>
    [Theory]
    [InlineData(10)] // inside the request header
    [InlineData(NbdLimits.RequestHeaderLength)] // the header, none of the payload
    [InlineData(NbdLimits.RequestHeaderLength + 1000)] // in the middle of the payload
    [InlineData(NbdLimits.RequestHeaderLength + 65536)] // the whole request, before any reply
    public async Task A_write_cut_at_any_point_of_its_request_is_sent_again_whole_on_a_new_connection(int bytesRead)
    {
        var data = Patterns.Generate(4096, 65536, seed: 3);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            if (c.Number == 1)
            {
                await c.ReadExactlyAsync(bytesRead);
                c.Reset();
                return;
            }

            var (request, payload) = await c.ReadRequestAsync();
            Assert.Equal(NbdCommand.Write, request.Command);
            Assert.Equal(4096UL, request.Offset);
            Assert.Equal(data, payload);
            await c.SendSimpleReplyAsync(request.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        await client.WriteAsync(4096, data, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(1, client.Reconnections);
        Assert.Equal(1, client.ResentRequests);
        Assert.Equal(0, client.UnacknowledgedCount);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task A_write_whose_reply_is_cut_short_is_sent_again_and_acknowledged_on_the_new_connection()
    {
        var data = Patterns.Generate(0, 4096, seed: 9);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (request, payload) = await c.ReadRequestAsync();
            Assert.Equal(data, payload);
            if (c.Number == 1)
            {
                // The server wrote the data; 8 of the reply's 16 bytes leave before it dies.
                var reply = new byte[SimpleReply.Length];
                SimpleReply.Write(reply, NbdError.None, request.Cookie);
                await c.SendAsync(reply[..8]);
                c.Reset();
                return;
            }

            await c.SendSimpleReplyAsync(request.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        await client.WriteAsync(0, data, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(1, client.ResentRequests);
        Assert.Equal(2, server.ConnectionCount);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    /// <summary>A 64 KiB READ whose reply the server starts, with wrong bytes, and does not finish: the whole read goes out again.</summary>
    [Theory]
    [InlineData("structured: in the middle of a data chunk")]
    [InlineData("structured: after a whole chunk that is not the last")]
    [InlineData("simple: after the reply header")]
    [InlineData("simple: in the middle of the data")]
    public async Task A_read_cut_at_any_point_of_its_reply_is_read_again_whole(string cut)
    {
        var structured = cut.StartsWith("structured", StringComparison.Ordinal);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable, structured);
            var (request, _) = await c.ReadRequestAsync();
            if (c.Number == 1)
            {
                var wrong = Enumerable.Repeat((byte)0xee, (int)request.Length / 2).ToArray();
                switch (cut)
                {
                    case "structured: in the middle of a data chunk":
                        // A chunk promising 64 KiB, 1000 bytes of it.
                        var header = new byte[StructuredReplyHeader.Length + 8];
                        StructuredReplyHeader.Write(header, ReplyFlags.Done, ReplyType.OffsetData, request.Cookie, request.Length + 8);
                        BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(20), request.Offset);
                        await c.SendAsync([.. header, .. wrong[..1000]]);
                        break;
                    case "structured: after a whole chunk that is not the last":
                        await c.SendDataChunkAsync(request.Cookie, request.Offset, wrong, done: false);
                        break;
                    case "simple: after the reply header":
                        await c.SendSimpleReplyAsync(request.Cookie);
                        break;
                    default:
                        await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, wrong[..1000]);
                        break;
                }

                c.Reset();
                return;
            }

            var data = Patterns.Generate((long)request.Offset, (int)request.Length, seed: 4);
            await (structured ? c.SendDataChunkAsync(request.Cookie, request.Offset, data) : c.SendSimpleReplyAsync(request.Cookie, NbdError.None, data));
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        Assert.Equal(structured, client.Export.StructuredReplies);
        var buffer = new byte[65536];
        await client.ReadAsync(131072, buffer, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(Patterns.Generate(131072, 65536, seed: 4), buffer);
        Assert.Equal(1, client.ResentRequests);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task A_connection_lost_between_a_write_reply_and_the_flush_sends_only_the_flush_on_the_new_connection()
    {
        var seenAfterReconnect = new List<NbdCommand>();
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            if (c.Number == 1)
            {
                var (write, _) = await c.ReadRequestAsync();
                await c.SendSimpleReplyAsync(write.Cookie);
                c.Reset();
                return;
            }

            var (request, _) = await c.ReadRequestAsync();
            seenAfterReconnect.Add(request.Command);
            await c.SendSimpleReplyAsync(request.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        await client.WriteAsync(0, new byte[4096], Token).AsTask().WaitAsync(Bound, Token);

        // The write is acknowledged and the connection is gone; the flush is called once the client is back.
        var watch = System.Diagnostics.Stopwatch.StartNew();
        while (client.Reconnections == 0)
        {
            Assert.True(watch.Elapsed < Bound, "the client did not reconnect");
            await Task.Delay(10, Token);
        }

        await client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal([NbdCommand.Flush], seenAfterReconnect);
        Assert.Equal(0, client.ResentRequests);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task After_a_cut_the_flush_waits_for_every_replayed_write_even_when_they_are_answered_out_of_order()
    {
        var writesArrived = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var flushCalled = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var replayed = new List<ulong>();
        var flushSeenEarly = false;
        NbdCommand? afterBothAcknowledged = null;
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            if (c.Number == 1)
            {
                var (first, _) = await c.ReadRequestAsync();
                await c.SendSimpleReplyAsync(first.Cookie);
                await c.ReadRequestAsync();
                await c.ReadRequestAsync();
                writesArrived.SetResult();
                await flushCalled.Task.WaitAsync(Bound);
                c.Reset();
                return;
            }

            var (a, _) = await c.ReadRequestAsync();
            var (b, _) = await c.ReadRequestAsync();
            replayed.AddRange([a.Offset, b.Offset]);

            // The later write is answered first; the flush must still wait for the earlier one.
            await c.SendSimpleReplyAsync(b.Cookie);
            flushSeenEarly = !c.NothingArrivesWithin(TimeSpan.FromMilliseconds(300));
            await c.SendSimpleReplyAsync(a.Cookie);
            var (next, _) = await c.ReadRequestAsync();
            afterBothAcknowledged = next.Command;
            await c.SendSimpleReplyAsync(next.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        await client.WriteAsync(0, Patterns.Generate(0, 4096, seed: 1), Token);
        var second = client.WriteAsync(8192, Patterns.Generate(8192, 4096, seed: 1), Token).AsTask();
        var third = client.WriteAsync(16384, Patterns.Generate(16384, 4096, seed: 1), Token).AsTask();
        await writesArrived.Task.WaitAsync(Bound, Token);
        var flush = client.FlushAsync(Token).AsTask();
        flushCalled.SetResult();
        await Task.WhenAll(second, third, flush).WaitAsync(Bound, Token);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();

        // The unanswered writes went out again in their order (the answered one did not), and the FLUSH came last.
        Assert.Equal([8192UL, 16384UL], replayed);
        Assert.False(flushSeenEarly, "the FLUSH was sent before every write before it was acknowledged");
        Assert.Equal(NbdCommand.Flush, afterBothAcknowledged);
        Assert.Equal(2, client.ResentRequests);
    }

    [Fact]
    public async Task A_flush_waits_for_a_write_lost_with_its_connection_to_be_acknowledged_again()
    {
        var secondWriteArrived = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var flushCalled = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var replayedWriteArrived = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var mayAcknowledge = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var seenAfterReconnect = new List<(NbdCommand Command, ulong Offset)>();
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            if (c.Number == 1)
            {
                var (first, _) = await c.ReadRequestAsync();
                await c.SendSimpleReplyAsync(first.Cookie);
                await c.ReadRequestAsync();
                secondWriteArrived.SetResult();

                // The flush is called while the second write has no reply; then the connection dies.
                await flushCalled.Task.WaitAsync(Bound);
                c.Reset();
                return;
            }

            var (replayed, _) = await c.ReadRequestAsync();
            seenAfterReconnect.Add((replayed.Command, replayed.Offset));
            replayedWriteArrived.SetResult();
            await mayAcknowledge.Task.WaitAsync(Bound);
            await c.SendSimpleReplyAsync(replayed.Cookie);
            var (flush, _) = await c.ReadRequestAsync();
            seenAfterReconnect.Add((flush.Command, flush.Offset));
            await c.SendSimpleReplyAsync(flush.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        await client.WriteAsync(0, new byte[4096], Token);
        var second = client.WriteAsync(8192, new byte[4096], Token).AsTask();
        await secondWriteArrived.Task.WaitAsync(Bound, Token);
        var flush = client.FlushAsync(Token).AsTask();
        flushCalled.SetResult();

        // The write went out again; the FLUSH has not even been submitted, because the write has no reply yet.
        await replayedWriteArrived.Task.WaitAsync(Bound, Token);
        Assert.Equal(1, client.UnacknowledgedCount);
        Assert.False(flush.IsCompleted);
        mayAcknowledge.SetResult();
        await second.WaitAsync(Bound, Token);
        await flush.WaitAsync(Bound, Token);

        // The acknowledged first write was not sent again.
        Assert.Equal([(NbdCommand.Write, 8192UL), (NbdCommand.Flush, 0UL)], seenAfterReconnect);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task A_flush_lost_with_its_connection_is_sent_again_and_only_then_answered()
    {
        var seenAfterReconnect = new List<NbdCommand>();
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            if (c.Number == 1)
            {
                var (write, _) = await c.ReadRequestAsync();
                await c.SendSimpleReplyAsync(write.Cookie);
                var (flush, _) = await c.ReadRequestAsync();
                Assert.Equal(NbdCommand.Flush, flush.Command);
                c.Reset();
                return;
            }

            var (again, _) = await c.ReadRequestAsync();
            seenAfterReconnect.Add(again.Command);
            await c.SendSimpleReplyAsync(again.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        await client.WriteAsync(0, new byte[4096], Token);
        await client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal([NbdCommand.Flush], seenAfterReconnect);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Requests_answered_eshutdown_are_sent_again_after_reconnecting()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            if (c.Number == 1)
            {
                var (first, _) = await c.ReadRequestAsync();
                var (second, _) = await c.ReadRequestAsync();
                await c.SendErrorChunkAsync(first.Cookie, NbdError.Shutdown, "restarting");
                await c.SendSimpleReplyAsync(second.Cookie);

                // The client finishes what is in flight, then says goodbye.
                var (disconnect, _) = await c.ReadRequestAsync();
                Assert.Equal(NbdCommand.Disconnect, disconnect.Command);
                await c.WaitForClientCloseAsync();
                return;
            }

            var (again, payload) = await c.ReadRequestAsync();
            Assert.Equal(NbdCommand.Write, again.Command);
            Assert.Equal(0UL, again.Offset);
            Assert.Equal(Patterns.Generate(0, 512, seed: 8), payload);
            await c.SendSimpleReplyAsync(again.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        var first = client.WriteAsync(0, Patterns.Generate(0, 512, seed: 8), Token).AsTask();
        var second = client.WriteAsync(512, new byte[512], Token).AsTask();
        await Task.WhenAll(first, second).WaitAsync(Bound, Token);
        Assert.Equal(1, client.ResentRequests);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task Requests_wait_while_the_server_is_down_and_go_out_when_it_is_back()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            if (c.Number is > 1 and < 5)
            {
                // Down: the connection is accepted and closed at once (the handshake fails, the client backs off).
                c.Close();
                return;
            }

            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            if (c.Number == 1)
            {
                c.Reset();
                return;
            }

            await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, Patterns.Generate((long)request.Offset, (int)request.Length));
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        var buffer = new byte[4096];
        await client.ReadAsync(4096, buffer, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(Patterns.Generate(4096, 4096), buffer);
        Assert.Equal(5, server.ConnectionCount);
        Assert.Equal(1, client.Reconnections);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task The_dead_connection_timeout_fails_waiting_and_new_requests_with_the_last_error()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            if (c.Number > 1)
            {
                c.Close();
                return;
            }

            await c.HandshakeAsync(Size, Writable);
            await c.ReadRequestAsync();
            c.Reset();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(TimeSpan.FromSeconds(1)), Token);
        var error = await Assert.ThrowsAsync<NbdConnectionException>(() => client.ReadAsync(0, new byte[512], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("READ offset 0 length 512 failed: no connection to 127.0.0.1:", error.Message, StringComparison.Ordinal);
        Assert.Contains("(the dead-connection timeout)", error.Message, StringComparison.Ordinal);
        Assert.Contains("closed the connection during the handshake", error.Message, StringComparison.Ordinal);

        // Until a connection is back, new requests fail at once with the same reason.
        var next = await Assert.ThrowsAsync<NbdConnectionException>(() => client.WriteAsync(0, new byte[512], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("(the dead-connection timeout)", next.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_server_that_comes_back_with_another_export_is_not_used()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            if (c.Number == 1)
            {
                await c.HandshakeAsync(Size, Writable);
                await c.ReadRequestAsync();
                c.Reset();
                return;
            }

            // Restarted with a smaller image under the same name: requests must not reach it (a larger one is the
            // same export grown, GrowingExportTests).
            await c.HandshakeAsync(Size / 2, Writable);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(TimeSpan.FromSeconds(2)), Token);
        var error = await Assert.ThrowsAsync<NbdConnectionException>(() => client.WriteAsync(0, new byte[512], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("now serves a different export under ''", error.Message, StringComparison.Ordinal);
        Assert.Contains("size 524288 instead of 1048576", error.Message, StringComparison.Ordinal);
        Assert.Equal(0, client.Reconnections);
    }

    [Fact]
    public async Task A_silent_server_is_taken_for_dead_after_the_reply_timeout_and_the_request_goes_out_again()
    {
        var firstClosedByClient = false;
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            if (c.Number == 1)
            {
                // No reply, no close: a hung server (or a network that drops everything).
                firstClosedByClient = await c.WaitForClientCloseAsync(Bound);
                return;
            }

            await c.SendSimpleReplyAsync(request.Cookie);
            await c.WaitForClientCloseAsync();
        });
        var options = Fast();
        options.ReplyTimeout = TimeSpan.FromMilliseconds(500);
        await using var client = await NbdClient.ConnectAsync(server.Uri(), options, Token);
        await client.TrimAsync(0, 65536, cancellationToken: Token).AsTask().WaitAsync(Bound, Token);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
        Assert.True(firstClosedByClient, "the client should have closed the silent connection");
        Assert.Equal(2, server.ConnectionCount);
    }

    [Fact]
    public async Task A_request_cancelled_while_waiting_for_a_connection_is_never_sent()
    {
        var firstRequestArrived = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var serverBack = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        ulong? firstOffsetAfterReconnect = null;
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            if (c.Number > 1)
            {
                await serverBack.Task.WaitAsync(Bound);
            }

            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            if (c.Number == 1)
            {
                firstRequestArrived.SetResult();
                c.Reset();
                return;
            }

            firstOffsetAfterReconnect = request.Offset;
            await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, new byte[request.Length]);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        using var cancel = CancellationTokenSource.CreateLinkedTokenSource(Token);
        var cancelled = client.ReadAsync(0, new byte[512], cancel.Token).AsTask();
        await firstRequestArrived.Task.WaitAsync(Bound, Token);
        await cancel.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => cancelled.WaitAsync(Bound, Token));

        var later = client.ReadAsync(8192, new byte[512], Token).AsTask();
        serverBack.SetResult();
        await later.WaitAsync(Bound, Token);
        Assert.Equal(8192UL, firstOffsetAfterReconnect);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    [Fact]
    public async Task A_protocol_violation_fails_the_requests_in_flight_and_later_requests_use_a_new_connection()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable);
            var (request, _) = await c.ReadRequestAsync();
            if (c.Number == 1)
            {
                await c.SendAsync([0xde, 0xad, 0xbe, 0xef, .. new byte[12]]);
                await c.WaitForClientCloseAsync();
                return;
            }

            await c.SendSimpleReplyAsync(request.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => client.WriteAsync(0, new byte[512], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains("neither a simple reply", error.Message, StringComparison.Ordinal);
        await client.WriteAsync(0, new byte[512], Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(0, client.ResentRequests);
        await client.DisposeAsync();
        await server.WaitForScriptsAsync();
    }

    // ---- multipath ----

    [Fact]
    public async Task Multipath_spreads_requests_and_moves_them_off_a_path_that_dies()
    {
        const TransmissionFlags Shared = Writable | TransmissionFlags.CanMultiConn;
        var servedByA = 0;
        var servedByB = 0;
        await using var a = ScriptedNbdServer.Start(async c =>
        {
            if (c.Number > 1)
            {
                // Path A stays down.
                c.Close();
                return;
            }

            await c.HandshakeAsync(Size, Shared);
            while (true)
            {
                var (request, _) = await c.ReadRequestAsync();
                if (Interlocked.Increment(ref servedByA) > 20)
                {
                    // Dies with this request (and maybe others) unanswered.
                    c.Reset();
                    return;
                }

                await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, Patterns.Generate((long)request.Offset, (int)request.Length, seed: 6));
            }
        });
        await using var b = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Shared);
            while (true)
            {
                var (request, _) = await c.ReadRequestAsync();
                Interlocked.Increment(ref servedByB);
                await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, Patterns.Generate((long)request.Offset, (int)request.Length, seed: 6));
            }
        });
        var options = Fast();
        options.StructuredReplies = false;
        await using var client = await NbdClient.ConnectAsync([NbdUri.Parse(a.Uri()), NbdUri.Parse(b.Uri())], options, Token);
        Assert.Equal(2, client.ConnectionCount);
        for (var round = 0; round < 10; round++)
        {
            var reads = Enumerable.Range(0, 8).Select(async i =>
            {
                var offset = ((round * 8) + i) * 4096L;
                var buffer = new byte[4096];
                await client.ReadAsync(offset, buffer, Token);
                Assert.Equal(Patterns.Generate(offset, 4096, seed: 6), buffer);
            });
            await Task.WhenAll(reads).WaitAsync(Bound, Token);
        }

        Assert.True(servedByA > 0 && servedByB > 0, $"A served {servedByA}, B {servedByB}");
        Assert.Equal(0, client.PathStatus[0].Connections);
        Assert.NotNull(client.PathStatus[0].LastError);
        Assert.Equal(1, client.PathStatus[1].Connections);
    }

    [Fact]
    public async Task Paths_that_describe_different_exports_are_refused()
    {
        await using var a = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size, Writable | TransmissionFlags.CanMultiConn);
            await c.WaitForClientCloseAsync();
        });
        await using var b = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Size / 2, Writable | TransmissionFlags.CanMultiConn);
            await c.WaitForClientCloseAsync();
        });
        var error = await Assert.ThrowsAsync<NbdConnectionException>(() => NbdClient.ConnectAsync([NbdUri.Parse(a.Uri()), NbdUri.Parse(b.Uri())], Fast(), Token));
        Assert.Contains("do not serve the same export, so they cannot be paths to one disk: size 524288 instead of 1048576", error.Message, StringComparison.Ordinal);
    }
}
