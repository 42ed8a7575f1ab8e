using System.Buffers.Binary;
using Spindle.Client;
using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// The client's side of NBD_OPT_EXTENDED_HEADERS against a scripted server: what it sends (32-byte requests, 64-bit
/// lengths, PAYLOAD_LEN on writes, the BLOCK_STATUS payload naming one context) and how it reads extended chunks,
/// including the malformed ones it must hang up on. Real servers (Spindle's, qemu-nbd 10) are in the interop tests.
/// </summary>
public sealed class ExtendedHeaderClientTests
{
    private const ulong Big = 8UL << 40;
    private const TransmissionFlags Writable = TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.SendTrim
        | TransmissionFlags.SendWriteZeroes | TransmissionFlags.BlockStatusPayload;

    private static readonly NbdClientOptions NoReconnect = new() { DeadConnectionTimeout = TimeSpan.Zero };
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(20);

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Requests_are_extended_and_long_effects_go_out_whole()
    {
        var seen = new List<NbdRequest>();
        var data = Patterns.Generate(0, 4096);
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            var options = await c.HandshakeAsync(Big, Writable, extended: true);
            Assert.Equal(NbdOption.ExtendedHeaders, options[0]);
            Assert.DoesNotContain(NbdOption.StructuredReply, options);
            for (var i = 0; i < 4; i++)
            {
                var (request, payload) = await c.ReadRequestAsync();
                seen.Add(request);
                switch (request.Command)
                {
                    case NbdCommand.Write:
                        Assert.Equal(data, payload);
                        await c.SendExtendedChunkAsync(ReplyFlags.Done, ReplyType.None, request.Cookie, request.Offset, []);
                        break;
                    case NbdCommand.Read:
                        var chunk = new byte[8 + 4096];
                        BinaryPrimitives.WriteUInt64BigEndian(chunk, request.Offset);
                        data.CopyTo(chunk, 8);
                        await c.SendExtendedChunkAsync(ReplyFlags.Done, ReplyType.OffsetData, request.Cookie, request.Offset, chunk);
                        break;
                    case NbdCommand.BlockStatus:
                        await c.SendExtendedBlockStatusAsync(request, 1, [(5UL << 30, 3), (1UL << 20, 0)]);
                        break;
                    default:
                        await c.SendExtendedChunkAsync(ReplyFlags.Done, ReplyType.None, request.Cookie, request.Offset, []);
                        break;
                }
            }

            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        Assert.True(client.Export.ExtendedHeaders);
        Assert.True(client.Export.StructuredReplies);
        Assert.True(client.Export.CanFilterBlockStatus);

        await client.WriteAsync(1L << 40, data, Token).AsTask().WaitAsync(Bound, Token);
        var back = new byte[4096];
        await client.ReadAsync(1L << 40, back, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(data, back);
        var status = await client.GetBlockStatusAsync(0, 6L << 30, cancellationToken: Token).WaitAsync(Bound, Token);
        Assert.Equal([(0L, 5L << 30, 3u), (5L << 30, 1L << 20, 0u)], status.Extents.Select(e => (e.Offset, e.Length, e.Flags)));
        await client.TrimAsync(1L << 30, 6L << 30, cancellationToken: Token).AsTask().WaitAsync(Bound, Token);

        Assert.All(seen, r => Assert.True(r.IsExtended));
        Assert.Equal(CommandFlags.PayloadLength, seen[0].Flags & CommandFlags.PayloadLength);
        Assert.Equal((NbdCommand.BlockStatus, 6UL << 30, false), (seen[2].Command, seen[2].LongLength, seen[2].HasPayload));
        Assert.Equal((NbdCommand.Trim, 1UL << 30, 6UL << 30), (seen[3].Command, seen[3].Offset, seen[3].LongLength));
    }

    [Fact]
    public async Task With_several_contexts_a_block_status_names_the_one_it_wants()
    {
        NbdRequest? seen = null;
        byte[] payload = [];
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Big, Writable, contexts: [MetaContexts.BaseAllocation, "qemu:dirty-bitmap:b0"], extended: true);
            (var request, payload) = await c.ReadRequestAsync();
            seen = request;
            await c.SendExtendedBlockStatusAsync(request, 2, [(65536, 1)]);
            await c.WaitForClientCloseAsync();
        });
        var options = new NbdClientOptions { DeadConnectionTimeout = TimeSpan.Zero };
        options.MetaContexts.Add("qemu:dirty-bitmap:b0");
        await using var client = await NbdClient.ConnectAsync(server.Uri(), options, Token);
        var status = await client.GetBlockStatusAsync(4096, 65536, "qemu:dirty-bitmap:b0", cancellationToken: Token).WaitAsync(Bound, Token);
        Assert.Equal([(4096L, 65536L, 1u)], status.Extents.Select(e => (e.Offset, e.Length, e.Flags)));

        Assert.NotNull(seen);
        Assert.True(seen.Value.HasPayload);
        Assert.Equal(ParseStatus.Done, BlockStatusPayload.TryRead(payload, (ulong)payload.Length, 2, out var parsed, out _));
        Assert.Equal(65536UL, parsed!.EffectLength);
        Assert.Equal([2u], parsed.ContextIds);
    }

    [Fact]
    public async Task Without_extended_headers_asked_the_client_stays_compact()
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            var options = await c.HandshakeAsync(Big, Writable, extended: true);
            Assert.DoesNotContain(NbdOption.ExtendedHeaders, options);
            var (request, _) = await c.ReadRequestAsync();
            Assert.False(request.IsExtended);
            await c.SendSimpleReplyAsync(request.Cookie);
            await c.WaitForClientCloseAsync();
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), new NbdClientOptions { ExtendedHeaders = false, DeadConnectionTimeout = TimeSpan.Zero }, Token);
        Assert.False(client.Export.ExtendedHeaders);
        Assert.False(client.Export.CanFilterBlockStatus); // BLOCK_STATUS_PAYLOAD does not count without extended headers
        await client.FlushAsync(Token).AsTask().WaitAsync(Bound, Token);
    }

    public static TheoryData<string, string> MalformedExtendedReplies => new()
    {
        { "simple-reply", "although extended headers were negotiated" },
        { "structured-chunk", "although extended headers were negotiated" },
        { "compact-block-status", "BLOCK_STATUS chunk although extended headers were negotiated" },
        { "count-mismatch", "says 5 descriptors in 1" },
        { "wide-status", "wider than 32 bits" },
        { "zero-length-extent", "extent of length 0" },
    };

    [Theory]
    [MemberData(nameof(MalformedExtendedReplies))]
    public async Task Malformed_extended_reply_is_a_protocol_error_that_ends_the_connection(string kind, string expected)
    {
        await using var server = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(Big, Writable, extended: true);
            var (request, _) = await c.ReadRequestAsync();
            switch (kind)
            {
                case "simple-reply":
                    await c.SendSimpleReplyAsync(request.Cookie);
                    break;
                case "structured-chunk":
                    await c.SendChunkAsync(ReplyFlags.Done, ReplyType.None, request.Cookie, []);
                    break;
                case "compact-block-status":
                    await c.SendExtendedChunkAsync(ReplyFlags.Done, ReplyType.BlockStatus, request.Cookie, request.Offset, new byte[12]);
                    break;
                case "count-mismatch":
                    await c.SendExtendedBlockStatusAsync(request, 1, [(4096, 0)], count: 5);
                    break;
                case "wide-status":
                    await c.SendExtendedBlockStatusAsync(request, 1, [(4096, 1UL << 40)]);
                    break;
                case "zero-length-extent":
                    await c.SendExtendedBlockStatusAsync(request, 1, [(0, 0)]);
                    break;
            }

            Assert.True(await c.WaitForClientCloseAsync(), "the client should hang up on a protocol violation");
        });
        await using var client = await NbdClient.ConnectAsync(server.Uri(), NoReconnect, Token);
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => client.GetBlockStatusAsync(0, 4096, cancellationToken: Token).WaitAsync(Bound, Token));
        Assert.Contains(expected, error.Message, StringComparison.Ordinal);
        await server.WaitForScriptsAsync();
    }
}
