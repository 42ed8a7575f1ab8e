using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>
/// NBD_OPT_EXTENDED_HEADERS (extension-ext-header; the reference sheet §8): negotiation, 32-byte requests with 64-bit
/// lengths, extended reply chunks, BLOCK_STATUS_EXT, request payloads, and the BLOCK_STATUS payload that names the
/// contexts to answer. In memory and over sockets.
/// </summary>
public sealed class ExtendedHeaderTests
{
    private const long Big = 8L << 40; // 8 TiB, sparse

    [Fact]
    public async Task Extended_headers_are_negotiated_only_when_asked_and_bring_their_flags()
    {
        await using var harness = new ServerHarness();
        await using (var compact = harness.Connect())
        {
            var (_, flags) = await compact.NegotiateAsync("mem");
            Assert.False(flags.HasFlag(TransmissionFlags.BlockStatusPayload));
            await compact.SendRequestAsync(NbdCommand.Flush, 1, 0, 0);
            var reply = await compact.ReadReplyAsync();
            Assert.False(reply.IsStructured); // compact: a simple reply is still allowed for FLUSH
        }

        await using var extended = harness.Connect();
        var (size, extendedFlags) = await extended.NegotiateAsync("mem", extended: true);
        Assert.Equal((ulong)ServerHarness.MemorySize, size);
        Assert.True(extendedFlags.HasFlag(TransmissionFlags.BlockStatusPayload));
        Assert.True(extendedFlags.HasFlag(TransmissionFlags.SendDf));
        await extended.SendExtendedRequestAsync(NbdCommand.Flush, 2, 0, 0);
        var none = await extended.ReadReplyAsync();
        Assert.Equal((ReplyType.None, true, 2ul, 0ul), (none.Type, none.IsDone, none.Cookie, none.ExtendedOffset!.Value));
    }

    [Fact]
    public async Task Repeats_data_and_structured_reply_after_extended_headers_get_the_prescribed_errors()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExtendedHeaders, [1, 2, 3]);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.ExtendedHeaders);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.ExtendedHeaders);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.StructuredReply);
        Assert.Equal(OptionReplyType.ErrorExtendedHeaderRequired, (await client.ReadOptionReplyAsync()).Header.Type);

        // Meta contexts are allowed: extended headers imply structured replies.
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("mem", [MetaContexts.BaseAllocation]).ToBytes());
        var contexts = await client.ReadOptionRepliesAsync(NbdOption.SetMetaContext);
        Assert.Equal([OptionReplyType.MetaContext, OptionReplyType.Ack], contexts.Select(c => c.Header.Type));
    }

    [Fact]
    public async Task Export_name_after_extended_headers_closes_the_connection()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExtendedHeaders);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.ExportName, "mem"u8);
        Assert.True(await client.WaitForCloseAsync());
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Every_command_works_with_extended_headers(bool sockets)
    {
        await using var harness = new ServerHarness(sockets: sockets);
        await using var client = harness.Connect();
        await client.NegotiateAsync("mem", extended: true);
        var data = Patterns.Generate(8192, 20_000);

        await client.SendExtendedRequestAsync(NbdCommand.Write, 1, 8192, (ulong)data.Length, CommandFlags.PayloadLength | CommandFlags.Fua, data);
        AssertDone(await client.ReadReplyAsync(), 1, 8192);

        await client.SendExtendedRequestAsync(NbdCommand.Read, 2, 8192, (ulong)data.Length);
        var chunks = await client.ReadStructuredReplyAsync(2);
        Assert.All(chunks, c => Assert.Equal(8192ul, c.ExtendedOffset));
        Assert.Equal(data, RawNbdClient.Reassemble(chunks, 8192, data.Length));

        // A read of a hole comes back as hole chunks, 32-bit hole sizes as in compact mode.
        await client.SendExtendedRequestAsync(NbdCommand.Read, 3, 1 << 20, 65536);
        var hole = Assert.Single(await client.ReadStructuredReplyAsync(3));
        Assert.Equal(ReplyType.OffsetHole, hole.Type);
        Assert.Equal(65536u, BinaryPrimitives.ReadUInt32BigEndian(hole.Payload.AsSpan(8)));

        await client.SendExtendedRequestAsync(NbdCommand.Flush, 4, 0, 0);
        AssertDone(await client.ReadReplyAsync(), 4, 0);
        await client.SendExtendedRequestAsync(NbdCommand.Cache, 5, 0, ServerHarness.MemorySize);
        AssertDone(await client.ReadReplyAsync(), 5, 0);
        await client.SendExtendedRequestAsync(NbdCommand.WriteZeroes, 6, 8192, 4096, CommandFlags.NoHole);
        AssertDone(await client.ReadReplyAsync(), 6, 8192);
        await client.SendExtendedRequestAsync(NbdCommand.Trim, 7, 1 << 20, 1 << 20);
        AssertDone(await client.ReadReplyAsync(), 7, 1 << 20);

        await client.SendExtendedRequestAsync(NbdCommand.BlockStatus, 8, 0, ServerHarness.MemorySize);
        var status = Assert.Single(await client.ReadStructuredReplyAsync(8));
        Assert.Equal(ReplyType.BlockStatusExtended, status.Type);
        var extents = ReadExtendedStatus(status.Payload, out var contextId);
        Assert.Equal(1u, contextId);
        Assert.Equal((ulong)ServerHarness.MemorySize, (ulong)extents.Sum(e => (long)e.Length));

        await client.SendExtendedRequestAsync(NbdCommand.Read, 9, 8192, 4096);
        Assert.Equal(new byte[4096], RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(9), 8192, 4096));

        await client.SendExtendedRequestAsync(NbdCommand.Disconnect, 10, 0, 0);
        Assert.True(await client.WaitForCloseAsync());
    }

    [Fact]
    public async Task Errors_are_extended_error_chunks_and_a_write_without_payload_len_still_carries_its_data()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.NegotiateAsync("mem", extended: true);

        // The extension says WRITE MUST set PAYLOAD_LEN, but qemu's client does not: its data follows all the same.
        var data = Patterns.Generate(0, 4096);
        await client.SendExtendedRequestAsync(NbdCommand.Write, 1, 0, 4096, CommandFlags.None, data);
        AssertDone(await client.ReadReplyAsync(), 1, 0);
        Assert.Equal(data, await ReadAsync(client, 99, 0, 4096));

        // A READ past the end: EINVAL in an extended ERROR chunk that echoes the offset.
        await client.SendExtendedRequestAsync(NbdCommand.Read, 2, ServerHarness.MemorySize, 4096);
        var pastEnd = await client.ReadReplyAsync();
        Assert.Equal((ReplyType.Error, NbdError.InvalidArgument, (ulong)ServerHarness.MemorySize), (pastEnd.Type, pastEnd.ChunkError, pastEnd.ExtendedOffset!.Value));

        // A READ over the maximum payload is refused, a WRITE_ZEROES past the end is ENOSPC.
        await client.SendExtendedRequestAsync(NbdCommand.Read, 3, 0, 64L << 20);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).ChunkError);
        await client.SendExtendedRequestAsync(NbdCommand.WriteZeroes, 4, 0, ServerHarness.MemorySize + 4096);
        Assert.Equal(NbdError.NoSpace, (await client.ReadReplyAsync()).ChunkError);

        // Still in step.
        await client.SendExtendedRequestAsync(NbdCommand.Flush, 5, 0, 0);
        AssertDone(await client.ReadReplyAsync(), 5, 0);
    }

    [Fact]
    public async Task An_unexpected_payload_is_read_and_refused_and_one_too_large_to_skip_closes()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.NegotiateAsync("mem", extended: true);

        await client.SendExtendedRequestAsync(NbdCommand.Read, 1, 0, 100, CommandFlags.PayloadLength, Patterns.Generate(0, 100));
        var refused = await client.ReadReplyAsync();
        Assert.Equal((NbdError.InvalidArgument, 1ul), (refused.ChunkError, refused.Cookie));

        // A refused WRITE (past the end) still has its payload consumed.
        var data = Patterns.Generate(1, 8192);
        await client.SendExtendedRequestAsync(NbdCommand.Write, 2, ServerHarness.MemorySize, (ulong)data.Length, CommandFlags.PayloadLength, data);
        Assert.Equal(NbdError.NoSpace, (await client.ReadReplyAsync()).ChunkError);
        await client.SendExtendedRequestAsync(NbdCommand.Flush, 3, 0, 0);
        AssertDone(await client.ReadReplyAsync(), 3, 0);

        // A payload length beyond what the server would ever skip is a denial of service: the connection closes.
        await client.SendExtendedRequestAsync(NbdCommand.Write, 4, 0, 1L << 40, CommandFlags.PayloadLength);
        Assert.True(await client.WaitForCloseAsync());
    }

    [Fact]
    public async Task Compact_request_after_extended_negotiation_is_out_of_step_and_closes()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.NegotiateAsync("mem", extended: true);

        // The server reads 32 bytes for a header; two compact ones give it a wrong magic to find.
        await client.SendRequestAsync(NbdCommand.Flush, 1, 0, 0);
        await client.SendRequestAsync(NbdCommand.Flush, 2, 0, 0);
        Assert.True(await client.WaitForCloseAsync());
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "NBD_EXTENDED_REQUEST_MAGIC");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task One_trim_zero_and_block_status_request_covers_more_than_4_GiB(bool sockets)
    {
        await using var harness = new ServerHarness(sockets: sockets, addExports: catalog => catalog.Add(new Export(new ExportOptions { Name = "big" }, new MemoryBlockDevice(Big))));
        await using var client = harness.Connect();
        var (size, _) = await client.NegotiateAsync("big", extended: true);
        Assert.Equal((ulong)Big, size);
        var data = Patterns.Generate(5L << 30, 65536);
        await client.SendExtendedRequestAsync(NbdCommand.Write, 1, 5L << 30, (ulong)data.Length, CommandFlags.PayloadLength, data);
        AssertDone(await client.ReadReplyAsync(), 1, 5L << 30);
        await client.SendExtendedRequestAsync(NbdCommand.Write, 2, 7L << 30, (ulong)data.Length, CommandFlags.PayloadLength, data);
        AssertDone(await client.ReadReplyAsync(), 2, 7L << 30);

        // The whole 8 TiB in one BLOCK_STATUS: hole, data at 5 GiB, hole, data at 7 GiB, hole to the end.
        await client.SendExtendedRequestAsync(NbdCommand.BlockStatus, 3, 0, Big);
        var extents = ReadExtendedStatus(Assert.Single(await client.ReadStructuredReplyAsync(3)).Payload, out _);
        Assert.Equal(
            [(5ul << 30, 3ul), (65536ul, 0ul), ((2ul << 30) - 65536, 3ul), (65536ul, 0ul), ((ulong)Big - (7ul << 30) - 65536, 3ul)],
            extents.Select(e => (e.Length, e.Status)));

        // One 6 GiB TRIM from 4 GiB removes both, one 4 GiB + 4 KiB WRITE_ZEROES is accepted whole.
        await client.SendExtendedRequestAsync(NbdCommand.Trim, 4, 4L << 30, 6L << 30);
        AssertDone(await client.ReadReplyAsync(), 4, 4L << 30);
        await client.SendExtendedRequestAsync(NbdCommand.WriteZeroes, 5, 0, (4L << 30) + 4096);
        AssertDone(await client.ReadReplyAsync(), 5, 0);
        await client.SendExtendedRequestAsync(NbdCommand.BlockStatus, 6, 0, Big);
        var after = ReadExtendedStatus(Assert.Single(await client.ReadStructuredReplyAsync(6)).Payload, out _);
        Assert.All(after, e => Assert.NotEqual(0ul, e.Status & (ulong)AllocationFlags.Zero));
        Assert.Equal((ulong)Big, after.Aggregate(0ul, (sum, e) => sum + e.Length));
        Assert.Equal(new byte[65536], await ReadAsync(client, 7, 5L << 30, 65536));
    }

    [Fact]
    public async Task A_block_status_payload_names_the_contexts_to_answer_and_bad_ones_are_refused_in_step()
    {
        await using var harness = new ServerHarness(addExports: catalog => catalog.Add(new Export(new ExportOptions { Name = "ctx" }, new ContextDevice(1 << 20))));
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExtendedHeaders);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);

        // LIST with a namespace query lists everything below it; SET selects exact names.
        await client.SendOptionAsync(NbdOption.ListMetaContext, new MetaContextRequest("ctx", ["x-test:"]).ToBytes());
        var listed = (await client.ReadOptionRepliesAsync(NbdOption.ListMetaContext)).Where(r => r.Header.Type == OptionReplyType.MetaContext).Select(r => MetaContextName(r.Data));
        Assert.Equal(["x-test:parity", "x-test:seven"], listed);
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("ctx", [MetaContexts.BaseAllocation, "x-test:parity", "x-test:seven"]).ToBytes());
        var selected = (await client.ReadOptionRepliesAsync(NbdOption.SetMetaContext)).Where(r => r.Header.Type == OptionReplyType.MetaContext)
            .ToDictionary(r => MetaContextName(r.Data), r => BinaryPrimitives.ReadUInt32BigEndian(r.Data));
        Assert.Equal(3, selected.Count);
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("ctx", []).ToBytes());
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionRepliesAsync(NbdOption.Go))[^1].Header.Type);

        // No payload: one chunk per selected context.
        await client.SendExtendedRequestAsync(NbdCommand.BlockStatus, 1, 0, 16384);
        var all = await client.ReadStructuredReplyAsync(1);
        Assert.Equal(3, all.Count);
        Assert.True(all[^1].IsDone);

        // A payload naming one context: only that one answers, over the payload's effect length.
        await client.SendExtendedRequestAsync(NbdCommand.BlockStatus, 2, 4096, 12, CommandFlags.PayloadLength, StatusPayload(16384, selected["x-test:parity"]));
        var parity = ReadExtendedStatus(Assert.Single(await client.ReadStructuredReplyAsync(2)).Payload, out var id);
        Assert.Equal(selected["x-test:parity"], id);
        Assert.Equal([(4096ul, 1ul), (4096ul, 0ul), (4096ul, 1ul), (4096ul, 0ul)], parity.Select(e => (e.Length, e.Status)));

        // Duplicate ids, an id never negotiated, a payload too long for the contexts, a zero effect length: EINVAL,
        // each payload consumed, the stream in step.
        var seven = selected["x-test:seven"];
        (byte[] Payload, string Reason)[] bad =
        [
            (StatusPayload(4096, seven, seven), "twice"),
            (StatusPayload(4096, 99), "not negotiated"),
            (StatusPayload(4096, 1, 2, 3, 4), "more than"),
            (StatusPayload(0, seven), "non-zero length"),
        ];
        for (var i = 0; i < bad.Length; i++)
        {
            var cookie = 10ul + (ulong)i;
            await client.SendExtendedRequestAsync(NbdCommand.BlockStatus, cookie, 0, (ulong)bad[i].Payload.Length, CommandFlags.PayloadLength, bad[i].Payload);
            var refused = await client.ReadReplyAsync();
            Assert.Equal((NbdError.InvalidArgument, cookie), (refused.ChunkError, refused.Cookie));
            Assert.Contains(bad[i].Reason, refused.ErrorMessage, StringComparison.Ordinal);
        }

        await client.SendExtendedRequestAsync(NbdCommand.BlockStatus, 20, 0, 12, CommandFlags.PayloadLength | CommandFlags.RequestOne, StatusPayload(1 << 20, seven));
        var one = ReadExtendedStatus(Assert.Single(await client.ReadStructuredReplyAsync(20)).Payload, out _);
        Assert.Equal([(1ul << 20, 7ul)], one.Select(e => (e.Length, e.Status)));
    }

    private static void AssertDone(RawReply reply, ulong cookie, long offset)
    {
        Assert.True(reply.Type == ReplyType.None && reply.IsDone, $"expected NONE with DONE, got {reply.Type} {reply.ErrorMessage}");
        Assert.Equal(cookie, reply.Cookie);
        Assert.Equal((ulong)offset, reply.ExtendedOffset);
    }

    private static async Task<byte[]> ReadAsync(RawNbdClient client, ulong cookie, long offset, int length)
    {
        await client.SendExtendedRequestAsync(NbdCommand.Read, cookie, (ulong)offset, (ulong)length);
        return RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(cookie), (ulong)offset, length);
    }

    private static byte[] StatusPayload(ulong effectLength, params uint[] ids)
    {
        var bytes = new byte[BlockStatusPayload.LengthFor(ids.Length)];
        BlockStatusPayload.Write(bytes, effectLength, ids);
        return bytes;
    }

    private static string MetaContextName(byte[] data) => System.Text.Encoding.UTF8.GetString(data.AsSpan(4));

    private static List<ExtendedBlockStatusExtent> ReadExtendedStatus(byte[] payload, out uint contextId)
    {
        Assert.Equal(ParseStatus.Done, StructuredReplyChunks.TryReadBlockStatusExtended(payload, (ulong)payload.Length, 1 << 20, out contextId, out var extents));
        return [.. extents];
    }

    /// <summary>A memory disk answering two more contexts: x-test:parity (1 on odd 4 KiB blocks) and x-test:seven.</summary>
    private sealed class ContextDevice(long size) : BlockDevice
    {
        private readonly MemoryBlockDevice _memory = new(size);

        public override long Size => _memory.Size;

        public override BlockDeviceFeatures Features => BlockDeviceFeatures.Extents | BlockDeviceFeatures.SharedCache;

        public override IReadOnlyList<MetaContextSource> MetaContexts { get; } = [new Parity(), new Seven()];

        public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
            _memory.ReadAsync(offset, destination, cancellationToken);

        public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
            _memory.GetExtentsAsync(offset, length, extents, cancellationToken);

        private sealed class Parity : MetaContextSource
        {
            public override string Name => "x-test:parity";

            public override ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken)
            {
                for (var position = offset; position < offset + length && !status.IsFull; position = (position / 4096 + 1) * 4096)
                {
                    status.Add(Math.Min((position / 4096 + 1) * 4096, offset + length) - position, (uint)(position / 4096 % 2));
                }

                return ValueTask.CompletedTask;
            }
        }

        private sealed class Seven : MetaContextSource
        {
            public override string Name => "x-test:seven";

            public override ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken)
            {
                status.Add(length, 7u);
                return ValueTask.CompletedTask;
            }
        }
    }
}
