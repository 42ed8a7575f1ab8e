using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>Every command, flag and error path of the transmission phase, over an in-memory connection.</summary>
public sealed class TransmissionTests
{
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Write_then_read_returns_the_same_bytes(bool structured)
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync(structured: structured);
        await using var _1 = client;
        var data = Patterns.Generate(12345, 100_000);
        await client.SendRequestAsync(NbdCommand.Write, 1, 12345, (uint)data.Length, CommandFlags.None, data);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);

        await client.SendRequestAsync(NbdCommand.Read, 2, 12345, (uint)data.Length);
        var read = structured
            ? RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(2), 12345, data.Length)
            : (await client.ReadReplyAsync(data.Length)).Payload;
        Assert.Equal(data, read);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Structured_read_of_a_hole_sends_hole_chunks_not_zeroes(bool sockets)
    {
        await using var harness = new ServerHarness(sockets: sockets);
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        var data = Patterns.Generate(65536, 4096);
        await client.SendRequestAsync(NbdCommand.Write, 1, 65536, 4096, CommandFlags.None, data);
        await client.ReadReplyAsync();

        // 0..64K hole, 64K..68K data, 68K..256K hole.
        await client.SendRequestAsync(NbdCommand.Read, 2, 0, 256 * 1024);
        var chunks = await client.ReadStructuredReplyAsync(2);
        Assert.Equal([ReplyType.OffsetHole, ReplyType.OffsetData, ReplyType.OffsetHole], chunks.Select(c => c.Type));
        Assert.True(chunks[^1].IsDone);
        Assert.Equal(4096 + 8, chunks[1].Payload.Length);
        var whole = RawNbdClient.Reassemble(chunks, 0, 256 * 1024);
        Assert.Equal(data, whole[65536..(65536 + 4096)]);
        Assert.Equal(256 * 1024 - 4096, whole.Count(b => b == 0));
    }

    [Fact]
    public async Task Dont_fragment_read_sends_exactly_one_content_chunk()
    {
        await using var harness = new ServerHarness();
        var (client, _, flags) = await harness.OpenAsync();
        await using var _1 = client;
        Assert.True(flags.HasFlag(TransmissionFlags.SendDf));
        var data = Patterns.Generate(4096, 4096);
        await client.SendRequestAsync(NbdCommand.Write, 1, 4096, 4096, CommandFlags.None, data);
        await client.ReadReplyAsync();

        await client.SendRequestAsync(NbdCommand.Read, 2, 0, 65536, CommandFlags.DontFragment);
        var chunks = await client.ReadStructuredReplyAsync(2);
        var single = Assert.Single(chunks);
        Assert.Equal(ReplyType.OffsetData, single.Type);
        Assert.Equal(data, RawNbdClient.Reassemble(chunks, 0, 65536)[4096..8192]);

        // All-hole DF read: a single hole chunk is the single content chunk.
        await client.SendRequestAsync(NbdCommand.Read, 3, 1024 * 1024, 65536, CommandFlags.DontFragment);
        Assert.Equal(ReplyType.OffsetHole, Assert.Single(await client.ReadStructuredReplyAsync(3)).Type);
    }

    [Fact]
    public async Task Dont_fragment_without_structured_replies_is_invalid()
    {
        await using var harness = new ServerHarness();
        var (client, _, flags) = await harness.OpenAsync(structured: false);
        await using var _1 = client;
        Assert.False(flags.HasFlag(TransmissionFlags.SendDf));
        await client.SendRequestAsync(NbdCommand.Read, 9, 0, 512, CommandFlags.DontFragment);
        var reply = await client.ReadReplyAsync(512);
        Assert.False(reply.IsStructured);
        Assert.Equal(NbdError.InvalidArgument, reply.Error);
        Assert.Empty(reply.Payload);
    }

    [Fact]
    public async Task Write_zeroes_trim_and_block_status_agree()
    {
        await using var harness = new ServerHarness();
        var (client, _, flags) = await harness.OpenAsync();
        await using var _1 = client;
        Assert.True(flags.HasFlag(TransmissionFlags.SendWriteZeroes | TransmissionFlags.SendTrim | TransmissionFlags.SendFastZero));
        await client.SendRequestAsync(NbdCommand.Write, 1, 0, 1024 * 1024, CommandFlags.None, Patterns.Generate(0, 1024 * 1024));
        await client.ReadReplyAsync();
        await client.SendRequestAsync(NbdCommand.WriteZeroes, 2, 256 * 1024, 256 * 1024, CommandFlags.NoHole);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.Trim, 3, 768 * 1024, 256 * 1024, CommandFlags.Fua);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.WriteZeroes, 4, 128 * 1024, 64 * 1024, CommandFlags.FastZero);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);

        await client.SendRequestAsync(NbdCommand.BlockStatus, 5, 0, 1024 * 1024);
        var status = Assert.Single(await client.ReadStructuredReplyAsync(5));
        Assert.Equal(ReplyType.BlockStatus, status.Type);
        var extents = ParseExtents(status.Payload);
        // data | fast zero (hole) | data | NO_HOLE zeroes (memory stores no zero chunks: hole) | data | trimmed (hole)
        Assert.Equal([(128u * 1024, 0u), (64u * 1024, 3u), (64u * 1024, 0u), (256u * 1024, 3u), (256u * 1024, 0u), (256u * 1024, 3u)], extents);

        await client.SendRequestAsync(NbdCommand.Read, 6, 0, 1024 * 1024);
        var bytes = RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(6), 0, 1024 * 1024);
        Assert.Equal(Patterns.Generate(0, 128 * 1024), bytes[..(128 * 1024)]);
        Assert.All(bytes[(128 * 1024)..(192 * 1024)], b => Assert.Equal(0, b));
        Assert.Equal(Patterns.Generate(192 * 1024, 64 * 1024), bytes[(192 * 1024)..(256 * 1024)]);
        Assert.All(bytes[(256 * 1024)..(512 * 1024)], b => Assert.Equal(0, b));
        Assert.Equal(Patterns.Generate(512 * 1024, 256 * 1024), bytes[(512 * 1024)..(768 * 1024)]);
        Assert.All(bytes[(768 * 1024)..], b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Fast_zero_that_would_be_slow_fails_with_enotsup_and_changes_nothing()
    {
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "slow" }, new SlowZeroBlockDevice(1024 * 1024))));
        var (client, _, flags) = await harness.OpenAsync("slow");
        await using var _1 = client;
        Assert.True(flags.HasFlag(TransmissionFlags.SendFastZero));
        var data = Patterns.Generate(0, 8192);
        await client.SendRequestAsync(NbdCommand.Write, 1, 0, 8192, CommandFlags.None, data);
        await client.ReadReplyAsync();

        await client.SendRequestAsync(NbdCommand.WriteZeroes, 2, 0, 8192, CommandFlags.FastZero);
        var fast = await client.ReadReplyAsync();
        Assert.Equal(NbdError.NotSupported, fast.AnyError);
        await client.SendRequestAsync(NbdCommand.Read, 3, 0, 8192);
        Assert.Equal(data, RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(3), 0, 8192));

        // Without FAST_ZERO the same request must succeed, however slow.
        await client.SendRequestAsync(NbdCommand.WriteZeroes, 4, 0, 8192);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.Read, 5, 0, 8192);
        Assert.All(RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(5), 0, 8192), b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Block_status_with_request_one_returns_one_extent_within_the_request()
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Write, 1, 100_000, 10, CommandFlags.None, Patterns.Generate(0, 10));
        await client.ReadReplyAsync();
        await client.SendRequestAsync(NbdCommand.BlockStatus, 2, 0, 20_000, CommandFlags.RequestOne);
        var extents = ParseExtents(Assert.Single(await client.ReadStructuredReplyAsync(2)).Payload);
        Assert.Equal([(20_000u, 3u)], extents);

        await client.SendRequestAsync(NbdCommand.BlockStatus, 3, 0, 1_000_000);
        var many = ParseExtents(Assert.Single(await client.ReadStructuredReplyAsync(3)).Payload);
        Assert.Equal(1_000_000u, (uint)many.Sum(e => e.Length));
        Assert.True(many.Count >= 3);
    }

    [Fact]
    public async Task Flush_fua_and_cache_succeed_and_flush_reaches_the_backend()
    {
        var gated = new GatedBlockDevice(1024 * 1024);
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "gated" }, gated)));
        var (client, _, _) = await harness.OpenAsync("gated");
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Write, 1, 0, 4096, CommandFlags.Fua, Patterns.Generate(0, 4096));
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.Flush, 2, 0, 0);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        Assert.Equal(1, gated.Flushes);
        await client.SendRequestAsync(NbdCommand.Cache, 3, 0, 65536);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);

        // FUA is accepted on any command once advertised (the spec says some clients set it everywhere).
        await client.SendRequestAsync(NbdCommand.Flush, 4, 0, 0, CommandFlags.Fua);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
    }

    [Theory]
    [InlineData(NbdCommand.Write, NbdError.NotPermitted)]
    [InlineData(NbdCommand.Trim, NbdError.NotPermitted)]
    [InlineData(NbdCommand.WriteZeroes, NbdError.NotPermitted)]
    public async Task Writes_to_a_read_only_export_are_eperm_and_change_nothing(NbdCommand command, NbdError expected)
    {
        await using var harness = new ServerHarness();
        var (client, _, flags) = await harness.OpenAsync("ro");
        await using var _1 = client;
        Assert.True(flags.HasFlag(TransmissionFlags.ReadOnly));
        var payload = command == NbdCommand.Write ? new byte[4096] : null;
        await client.SendRequestAsync(command, 1, 0, 4096, CommandFlags.None, payload);
        var reply = await client.ReadReplyAsync();
        Assert.Equal(expected, reply.AnyError);
        Assert.Contains("read-only", reply.ErrorMessage, StringComparison.Ordinal);

        // The stream is still in step and the data is untouched.
        await client.SendRequestAsync(NbdCommand.Read, 2, 0, 4096);
        Assert.Equal(Patterns.Generate(0, 4096), RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(2), 0, 4096));
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), harness.PeerName, "EPERM");
    }

    [Theory]
    [InlineData(NbdCommand.Read, ServerHarness.MemorySize - 100, 200u, NbdError.InvalidArgument)]
    [InlineData(NbdCommand.Write, ServerHarness.MemorySize - 100, 200u, NbdError.NoSpace)]
    [InlineData(NbdCommand.WriteZeroes, ServerHarness.MemorySize, 1u, NbdError.NoSpace)]
    [InlineData(NbdCommand.Trim, ServerHarness.MemorySize + 4096, 4096u, NbdError.InvalidArgument)]
    [InlineData(NbdCommand.BlockStatus, ServerHarness.MemorySize, 4096u, NbdError.InvalidArgument)]
    [InlineData(NbdCommand.Cache, ServerHarness.MemorySize - 1, 2u, NbdError.InvalidArgument)]
    public async Task Out_of_range_requests_get_the_prescribed_error(NbdCommand command, long offset, uint length, NbdError expected)
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        var payload = command == NbdCommand.Write ? new byte[length] : null;
        await client.SendRequestAsync(command, 1, (ulong)offset, length, CommandFlags.None, payload);
        var reply = await client.ReadReplyAsync();
        Assert.Equal(1ul, reply.Cookie);
        Assert.Equal(expected, reply.AnyError);
        Assert.True(reply.IsStructured);
        Assert.Contains("beyond the end", reply.ErrorMessage, StringComparison.Ordinal);
        await AssertStillServesAsync(client);
    }

    [Fact]
    public async Task Offset_plus_length_overflowing_64_bits_is_caught()
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Read, 1, ulong.MaxValue - 10, 4096);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.Write, 2, ulong.MaxValue - 10, 16, CommandFlags.None, new byte[16]);
        Assert.Equal(NbdError.NoSpace, (await client.ReadReplyAsync()).AnyError);
        await AssertStillServesAsync(client);
    }

    [Theory]
    [InlineData((ushort)9, (ushort)0)] // unknown command
    [InlineData((ushort)8, (ushort)0)] // RESIZE, not advertised
    [InlineData((ushort)0, (ushort)0x40)] // unknown flag
    [InlineData((ushort)0, (ushort)CommandFlags.NoHole)] // flag for another command
    [InlineData((ushort)0, (ushort)CommandFlags.PayloadLength)] // extended headers were not negotiated
    [InlineData((ushort)6, (ushort)CommandFlags.RequestOne)]
    [InlineData((ushort)3, (ushort)CommandFlags.DontFragment)]
    public async Task Unknown_commands_and_flags_are_einval_with_no_payload_skipped(ushort command, ushort flags)
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        await client.SendRequestAsync((NbdCommand)command, 42, 0, 4096, (CommandFlags)flags);
        var reply = await client.ReadReplyAsync();
        Assert.Equal(42ul, reply.Cookie);
        Assert.Equal(NbdError.InvalidArgument, reply.AnyError);
        await AssertStillServesAsync(client);
    }

    [Fact]
    public async Task A_read_refused_up_front_is_still_a_structured_reply()
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Read, 1, 0, 512, CommandFlags.FastZero);
        var reply = await client.ReadReplyAsync();
        Assert.True(reply.IsStructured);
        Assert.Equal(ReplyType.Error, reply.Type);
        Assert.True(reply.IsDone);
        Assert.Equal(NbdError.InvalidArgument, reply.ChunkError);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Requests_over_the_maximum_payload_are_refused_and_their_payload_consumed(bool sockets)
    {
        await using var harness = new ServerHarness(sockets: sockets);
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        const uint tooBig = NbdLimits.DefaultMaxPayload + 4096;
        await client.SendRequestAsync(NbdCommand.Read, 1, 0, tooBig);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);

        // The 32 MiB + 4 KiB of a refused write are read and dropped: the stream stays in step.
        await client.SendRequestAsync(NbdCommand.Write, 2, 0, tooBig, CommandFlags.None, new byte[tooBig]);
        var reply = await client.ReadReplyAsync();
        Assert.Equal(2ul, reply.Cookie);
        Assert.Equal(NbdError.InvalidArgument, reply.AnyError);
        Assert.Contains("maximum block size", reply.ErrorMessage, StringComparison.Ordinal);
        await AssertStillServesAsync(client);

        // Exactly 32 MiB is accepted, whatever else is advertised.
        var big = Patterns.Generate(0, NbdLimits.DefaultMaxPayload);
        await client.SendRequestAsync(NbdCommand.Write, 3, 0, (uint)big.Length, CommandFlags.None, big);
        Assert.Equal(NbdError.NoSpace, (await client.ReadReplyAsync()).AnyError); // the export is 16 MiB
    }

    [Fact]
    public async Task A_write_too_big_to_discard_closes_the_connection_cleanly()
    {
        await using var harness = new ServerHarness(options => options.MaxDiscardedPayload = 64 * 1024 * 1024);
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Write, 1, 0, 0x7fffffff);
        Assert.True(await client.WaitForCloseAsync());
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), harness.PeerName, "too many to discard");
    }

    [Theory]
    [InlineData(NbdCommand.Read)]
    [InlineData(NbdCommand.Write)]
    [InlineData(NbdCommand.Trim)]
    [InlineData(NbdCommand.WriteZeroes)]
    [InlineData(NbdCommand.Cache)]
    public async Task Zero_length_requests_do_not_disconnect(NbdCommand command)
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        await client.SendRequestAsync(command, 1, 4096, 0);
        var reply = await client.ReadReplyAsync();
        Assert.True(reply.IsDone);
        Assert.Equal(NbdError.None, reply.AnyError);
        await AssertStillServesAsync(client);
    }

    [Fact]
    public async Task Flush_with_a_nonzero_offset_is_invalid()
    {
        await using var harness = new ServerHarness();
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Flush, 1, 512, 0);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);
    }

    [Fact]
    public async Task Block_status_without_a_context_is_invalid()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.NegotiateAsync("mem", structured: true, blockStatus: false);
        await client.SendRequestAsync(NbdCommand.BlockStatus, 1, 0, 4096);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);
    }

    [Fact]
    public async Task Minimum_block_size_is_enforced_with_einval()
    {
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(
            new ExportOptions { Name = "aligned", BlockSizes = new BlockSizeConstraints(512, 4096, NbdLimits.DefaultMaxPayload) },
            new Storage.MemoryBlockDevice(1024 * 1024))));
        var (client, _, _) = await harness.OpenAsync("aligned");
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Read, 1, 100, 512);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.Write, 2, 512, 100, CommandFlags.None, new byte[100]);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.Read, 3, 512, 512);
        Assert.Equal(NbdError.None, (await client.ReadStructuredReplyAsync(3))[^1].AnyError);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Backend_errors_are_reported_with_an_offset_and_the_message(bool sockets)
    {
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "bad" }, new FailingBlockDevice(1024 * 1024, NbdError.IO))), sockets: sockets);
        var (client, _, _) = await harness.OpenAsync("bad");
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Read, 1, 8192, 4096);
        var read = Assert.Single(await client.ReadStructuredReplyAsync(1));
        Assert.Equal(ReplyType.ErrorOffset, read.Type);
        Assert.Equal(NbdError.IO, read.ChunkError);
        Assert.True(StructuredReplyChunks.TryReadError(read.Payload, read.Type, out _, out var message, out var offset));
        Assert.Equal(8192ul, offset);
        Assert.Contains("injected", message, StringComparison.Ordinal);

        await client.SendRequestAsync(NbdCommand.Flush, 2, 0, 0);
        var flush = await client.ReadReplyAsync();
        Assert.Equal(ReplyType.Error, flush.Type);
        Assert.Equal(NbdError.IO, flush.ChunkError);

        await client.SendRequestAsync(NbdCommand.BlockStatus, 3, 0, 4096);
        Assert.Equal(NbdError.IO, (await client.ReadReplyAsync()).AnyError);
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), harness.PeerName, "EIO");
    }

    [Fact]
    public async Task Backend_errors_without_structured_replies_are_simple_replies_without_data()
    {
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "full" }, new FailingBlockDevice(1024 * 1024, NbdError.NoSpace))));
        var (client, _, _) = await harness.OpenAsync("full", structured: false);
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Read, 1, 0, 4096);
        var reply = await client.ReadReplyAsync(4096);
        Assert.Equal(NbdError.NoSpace, reply.Error);
        Assert.Empty(reply.Payload);
        await client.SendRequestAsync(NbdCommand.Write, 2, 0, 4, CommandFlags.None, [1, 2, 3, 4]);
        Assert.Equal(NbdError.NoSpace, (await client.ReadReplyAsync()).Error);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Requests_run_in_parallel_and_replies_come_out_of_order(bool sockets)
    {
        var gated = new GatedBlockDevice(1024 * 1024) { GatedFrom = 512 * 1024 };
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "gated" }, gated)), sockets: sockets);
        var (client, _, _) = await harness.OpenAsync("gated");
        await using var _1 = client;

        // Two slow reads first, then a fast one: the fast one is answered while the slow ones wait.
        await client.SendRequestAsync(NbdCommand.Read, 100, 512 * 1024, 4096);
        await client.SendRequestAsync(NbdCommand.Read, 101, 600 * 1024, 4096);
        await gated.WaitForWaitingReadsAsync(2, TimeSpan.FromSeconds(10));
        await client.SendRequestAsync(NbdCommand.Read, 102, 0, 4096);
        Assert.Equal(102ul, (await client.ReadReplyAsync()).Cookie);

        gated.Open();
        var rest = new HashSet<ulong> { (await client.ReadReplyAsync()).Cookie, (await client.ReadReplyAsync()).Cookie };
        Assert.Equal([100ul, 101ul], rest.Order());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Requests_in_flight_are_bounded_and_the_rest_wait_for_room(bool sockets)
    {
        var gated = new GatedBlockDevice(1024 * 1024);
        await using var harness = new ServerHarness(
            options => options.MaxRequestsInFlight = 4,
            c => c.Add(new Export(new ExportOptions { Name = "gated" }, gated)), sockets: sockets);
        var (client, _, _) = await harness.OpenAsync("gated");
        await using var _1 = client;
        for (var i = 0; i < 20; i++)
        {
            await client.SendRequestAsync(NbdCommand.Read, (ulong)i, (ulong)i * 4096, 4096);
        }

        await gated.WaitForWaitingReadsAsync(4, TimeSpan.FromSeconds(10));
        await Task.Delay(200);
        Assert.Equal(4, gated.MaxReadsWaiting);
        gated.Open();
        var cookies = new HashSet<ulong>();
        for (var i = 0; i < 20; i++)
        {
            var chunks = await client.ReadReplyAsync();
            Assert.True(chunks.IsDone);
            cookies.Add(chunks.Cookie);
        }

        Assert.Equal(20, cookies.Count);
        Assert.Equal(4, gated.MaxReadsWaiting);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Payload_bytes_in_flight_are_bounded(bool sockets)
    {
        var gated = new GatedBlockDevice(8 * 1024 * 1024);
        await using var harness = new ServerHarness(
            options => options.MaxBytesInFlight = 1024 * 1024,
            c => c.Add(new Export(new ExportOptions { Name = "gated" }, gated)), sockets: sockets);
        var (client, _, _) = await harness.OpenAsync("gated");
        await using var _1 = client;
        for (var i = 0; i < 8; i++)
        {
            await client.SendRequestAsync(NbdCommand.Read, (ulong)i, (ulong)i * 512 * 1024, 512 * 1024);
        }

        await gated.WaitForWaitingReadsAsync(2, TimeSpan.FromSeconds(10));
        await Task.Delay(200);
        Assert.Equal(2, gated.MaxReadsWaiting); // 2 x 512 KiB fills the 1 MiB budget
        gated.Open();
        var cookies = new HashSet<ulong>();
        for (var i = 0; i < 8; i++)
        {
            // Each reply is one hole chunk (the device holds only zeroes).
            var reply = await client.ReadReplyAsync();
            Assert.Equal(ReplyType.OffsetHole, reply.Type);
            Assert.True(reply.IsDone);
            cookies.Add(reply.Cookie);
        }

        Assert.Equal(8, cookies.Count);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Many_requests_in_flight_all_get_their_own_reply(bool sockets)
    {
        await using var harness = new ServerHarness(sockets: sockets);
        var (client, _, _) = await harness.OpenAsync();
        await using var _1 = client;
        const int count = 500;
        var batch = new List<byte>();
        for (var i = 0; i < count; i++)
        {
            var header = new byte[28];
            new NbdRequest(CommandFlags.None, NbdCommand.Write, (ulong)(1000 + i), (ulong)i * 4096, 4096).WriteTo(header);
            batch.AddRange(header);
            batch.AddRange(Patterns.Generate(i * 4096, 4096, seed: 7));
        }

        await client.SendRawAsync([.. batch]);
        var seen = new HashSet<ulong>();
        for (var i = 0; i < count; i++)
        {
            var reply = await client.ReadReplyAsync();
            Assert.Equal(NbdError.None, reply.AnyError);
            Assert.True(seen.Add(reply.Cookie));
        }

        Assert.Equal(Enumerable.Range(1000, count).Select(i => (ulong)i).ToHashSet(), seen);
        var check = new byte[count * 4096];
        await harness.Memory.ReadAsync(0, check, CancellationToken.None);
        Assert.Equal(Patterns.Generate(0, count * 4096, seed: 7), check);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Disconnect_answers_what_is_in_flight_then_closes(bool sockets)
    {
        var gated = new GatedBlockDevice(1024 * 1024);
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "gated" }, gated)), sockets: sockets);
        var (client, _, _) = await harness.OpenAsync("gated");
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Read, 7, 0, 4096);
        await gated.WaitForWaitingReadsAsync(1, TimeSpan.FromSeconds(10));
        await client.SendRequestAsync(NbdCommand.Disconnect, 8, 0, 0);
        await Task.Delay(100);
        gated.Open();
        var reply = await client.ReadReplyAsync();
        Assert.Equal(7ul, reply.Cookie);
        Assert.True(await client.WaitForCloseAsync());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_bad_request_magic_closes_only_that_connection(bool sockets)
    {
        await using var harness = new ServerHarness(sockets: sockets);
        var (other, _, _) = await harness.OpenAsync();
        await using var _2 = other;
        var (client, _, _) = await harness.OpenAsync();
        await using (client)
        {
            await client.SendRawAsync(new byte[28]);
            Assert.True(await client.WaitForCloseAsync());
        }

        await AssertStillServesAsync(other);
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), harness.PeerName, "out of step");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Graceful_stop_finishes_in_flight_requests_flushes_and_closes(bool sockets)
    {
        var gated = new GatedBlockDevice(1024 * 1024);
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "gated" }, gated)), sockets: sockets);
        var (client, _, _) = await harness.OpenAsync("gated");
        await using var _1 = client;
        await client.SendRequestAsync(NbdCommand.Write, 1, 0, 4096, CommandFlags.None, Patterns.Generate(0, 4096));
        await client.ReadReplyAsync();
        await client.SendRequestAsync(NbdCommand.Read, 2, 0, 4096);
        await gated.WaitForWaitingReadsAsync(1, TimeSpan.FromSeconds(10));

        var stop = harness.Server.StopAsync();
        await Task.Delay(200);
        Assert.False(stop.IsCompleted);

        // A request arriving while the server drains is refused with ESHUTDOWN; its write payload is consumed.
        await client.SendRequestAsync(NbdCommand.Write, 3, 8192, 4096, CommandFlags.None, new byte[4096]);
        var refused = await client.ReadReplyAsync();
        Assert.Equal((3ul, NbdError.Shutdown), (refused.Cookie, refused.AnyError));
        gated.Open();
        var chunks = await client.ReadStructuredReplyAsync(2);
        Assert.Equal(Patterns.Generate(0, 4096), RawNbdClient.Reassemble(chunks, 0, 4096));
        Assert.True(await client.WaitForCloseAsync());
        await stop.WaitAsync(TimeSpan.FromSeconds(15));
        Assert.True(gated.Flushes >= 1);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Many_connections_at_once_see_one_disk(bool sockets)
    {
        await using var harness = new ServerHarness(sockets: sockets);
        var clients = new List<RawNbdClient>();
        for (var i = 0; i < 16; i++)
        {
            clients.Add((await harness.OpenAsync()).Client);
        }

        await Task.WhenAll(clients.Select(async (client, i) =>
        {
            await client.SendRequestAsync(NbdCommand.Write, 1, (ulong)i * 65536, 65536, CommandFlags.Fua, Patterns.Generate(i * 65536, 65536, seed: i + 1));
            Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        }));

        // Each connection reads what another wrote (multi-conn: one shared view).
        await Task.WhenAll(clients.Select(async (client, i) =>
        {
            var j = (i + 1) % clients.Count;
            await client.SendRequestAsync(NbdCommand.Read, 2, (ulong)j * 65536, 65536);
            Assert.Equal(Patterns.Generate(j * 65536, 65536, seed: j + 1), RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(2), (ulong)j * 65536, 65536));
        }));

        foreach (var client in clients)
        {
            await client.DisposeAsync();
        }
    }

    internal static async Task AssertStillServesAsync(RawNbdClient client)
    {
        await client.SendRequestAsync(NbdCommand.Read, 0xfeed, 0, 512);
        var reply = await client.ReadReplyAsync(512);
        Assert.Equal(0xfeedul, reply.Cookie);
        Assert.Equal(NbdError.None, reply.AnyError);
        if (reply.IsStructured && !reply.IsDone)
        {
            Assert.True((await client.ReadStructuredReplyAsync(0xfeed))[^1].IsDone);
        }
    }

    private static List<(uint Length, uint Flags)> ParseExtents(byte[] payload)
    {
        var extents = new List<(uint, uint)>();
        for (var position = 4; position < payload.Length; position += 8)
        {
            extents.Add((BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(position)), BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(position + 4))));
        }

        return extents;
    }
}
