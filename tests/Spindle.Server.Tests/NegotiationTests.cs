using System.Buffers.Binary;
using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>Fixed newstyle negotiation, option by option, including every refusal, over an in-memory connection.</summary>
public sealed class NegotiationTests
{
    [Fact]
    public async Task Greeting_offers_fixed_newstyle_and_no_zeroes()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        Assert.Equal(HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes, await client.ReadGreetingAsync());
    }

    [Fact]
    public async Task Unknown_client_flags_close_the_connection()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.ReadGreetingAsync();
        await client.SendClientFlagsAsync((ClientFlags)0x8001);
        Assert.True(await client.WaitForCloseAsync());
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "memory-peer", "unknown client flags");
    }

    [Fact]
    public async Task Export_name_sends_size_flags_and_124_zeroes_without_no_zeroes()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync(ClientFlags.FixedNewstyle);
        await client.SendOptionAsync(NbdOption.ExportName, "mem"u8);
        var reply = await client.ReadExactlyAsync(ExportNameReply.FullLength);
        Assert.True(ExportNameReply.TryRead(reply, out var size, out var flags));
        Assert.Equal((ulong)ServerHarness.MemorySize, size);
        Assert.True(flags.HasFlag(TransmissionFlags.HasFlags));
        Assert.False(flags.HasFlag(TransmissionFlags.SendDf));
        Assert.All(reply[10..], b => Assert.Equal(0, b));

        // Straight into transmission: a simple-reply read works.
        await client.SendRequestAsync(NbdCommand.Read, 1, 0, 512);
        var read = await client.ReadReplyAsync(simpleReadLength: 512);
        Assert.False(read.IsStructured);
        Assert.Equal(NbdError.None, read.Error);
    }

    [Fact]
    public async Task Export_name_with_no_zeroes_omits_the_padding()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, "mem"u8);
        await client.ReadExactlyAsync(ExportNameReply.ShortLength);

        // The next bytes must be the reply to our request, not padding.
        await client.SendRequestAsync(NbdCommand.Flush, 77, 0, 0);
        var reply = await client.ReadReplyAsync();
        Assert.Equal(77ul, reply.Cookie);
        Assert.Equal(NbdError.None, reply.Error);
    }

    [Fact]
    public async Task Export_name_for_an_unknown_export_closes_the_connection()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, "nope"u8);
        Assert.True(await client.WaitForCloseAsync());
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "memory-peer", "nope");
    }

    [Fact]
    public async Task Empty_name_selects_the_default_export()
    {
        await using var harness = new ServerHarness();
        var (client, size, _) = await harness.OpenAsync(export: "");
        await using (client)
        {
            Assert.Equal((ulong)ServerHarness.MemorySize, size);
        }
    }

    [Fact]
    public async Task Abort_is_acknowledged_then_closed()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Abort, "ignored data"u8);
        var (header, data) = await client.ReadOptionReplyAsync();
        Assert.Equal((NbdOption.Abort, OptionReplyType.Ack, 0), (header.Option, header.Type, data.Length));
        Assert.True(await client.WaitForCloseAsync());
    }

    [Fact]
    public async Task List_names_every_export_with_its_description()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.List);
        var replies = await client.ReadOptionRepliesAsync(NbdOption.List);
        Assert.Equal(OptionReplyType.Ack, replies[^1].Header.Type);
        var entries = replies.SkipLast(1).Select(r =>
        {
            Assert.Equal(OptionReplyType.Server, r.Header.Type);
            Assert.True(ServerReply.TryParse(r.Data, out var name, out var description));
            return (name, description);
        }).ToList();
        Assert.Equal([("mem", "a memory disk"), ("ro", "")], entries);
    }

    [Fact]
    public async Task List_with_data_is_invalid_and_disabled_list_is_policy()
    {
        await using var harness = new ServerHarness(options => options.AllowList = false);
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.List, "x"u8);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.List);
        Assert.Equal(OptionReplyType.ErrorPolicy, (await client.ReadOptionReplyAsync()).Header.Type);
    }

    [Fact]
    public async Task Info_sends_export_then_requested_items_then_ack_and_stays_in_negotiation()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Info, new InfoRequest("", [InfoType.Name, InfoType.Description, InfoType.BlockSize, (InfoType)999]).ToBytes());
        var replies = await client.ReadOptionRepliesAsync(NbdOption.Info);
        Assert.Equal(OptionReplyType.Ack, replies[^1].Header.Type);
        var infos = replies.SkipLast(1).ToDictionary(r => { InfoReplies.TryReadType(r.Data, out var t); return t; }, r => r.Data);

        Assert.Equal(12, infos[InfoType.Export].Length);
        Assert.True(InfoReplies.TryReadExport(infos[InfoType.Export], out var size, out var flags));
        Assert.Equal((ulong)ServerHarness.MemorySize, size);
        Assert.Equal("mem", System.Text.Encoding.UTF8.GetString(infos[InfoType.Name].AsSpan(2)));
        Assert.Equal("a memory disk", System.Text.Encoding.UTF8.GetString(infos[InfoType.Description].AsSpan(2)));
        Assert.True(InfoReplies.TryReadBlockSize(infos[InfoType.BlockSize], out var sizes));
        Assert.Equal(BlockSizeConstraints.Default, sizes);
        Assert.Equal(4, infos.Count);

        // Still negotiating: GO with the same request gets the same information, then transmission.
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("", [InfoType.Name, InfoType.Description, InfoType.BlockSize, (InfoType)999]).ToBytes());
        var go = await client.ReadOptionRepliesAsync(NbdOption.Go);
        Assert.Equal(replies.Select(r => Convert.ToHexString(r.Data)), go.Select(r => Convert.ToHexString(r.Data)));
        Assert.True(InfoReplies.TryReadExport(go[0].Data, out _, out var goFlags));
        Assert.Equal(flags, goFlags);
    }

    [Fact]
    public async Task Go_for_an_unknown_export_is_unknown_and_negotiation_continues()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("missing", []).ToBytes());
        var (header, data) = await client.ReadOptionReplyAsync();
        Assert.Equal(OptionReplyType.ErrorUnknown, header.Type);
        Assert.Contains("missing", System.Text.Encoding.UTF8.GetString(data), StringComparison.Ordinal);
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("ro", []).ToBytes());
        var replies = await client.ReadOptionRepliesAsync(NbdOption.Go);
        Assert.Equal(OptionReplyType.Ack, replies[^1].Header.Type);
        Assert.True(InfoReplies.TryReadExport(replies[0].Data, out _, out var flags));
        Assert.True(flags.HasFlag(TransmissionFlags.ReadOnly));
    }

    [Fact]
    public async Task Info_with_a_name_length_overrunning_the_option_is_invalid_and_stays_in_step()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        var bad = new byte[10];
        BinaryPrimitives.WriteUInt32BigEndian(bad, 100);
        await client.SendOptionAsync(NbdOption.Info, bad);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);

        await client.SendOptionAsync(NbdOption.List);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionRepliesAsync(NbdOption.List))[^1].Header.Type);
    }

    [Theory]
    [InlineData(4u)] // NBD_OPT_PEEK_EXPORT, withdrawn
    [InlineData(0x1234u)]
    [InlineData(0xffffffffu)]
    public async Task Unknown_options_get_unsupported_after_their_data_is_skipped(uint option)
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();

        // Data that looks like another option: if the server failed to skip it, it would answer that instead.
        var data = new byte[OptionHeader.Length + 300];
        OptionHeader.Write(data, NbdOption.Abort, 0);
        await client.SendOptionAsync((NbdOption)option, data);
        var (header, _) = await client.ReadOptionReplyAsync();
        Assert.Equal(((NbdOption)option, OptionReplyType.ErrorUnsupported), (header.Option, header.Type));

        await client.SendOptionAsync(NbdOption.StructuredReply);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
    }

    [Fact]
    public async Task Starttls_without_tls_is_policy_and_never_tls_required()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StartTls);
        Assert.Equal(OptionReplyType.ErrorPolicy, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.StartTls, "x"u8);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("mem", []).ToBytes());
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionRepliesAsync(NbdOption.Go))[^1].Header.Type);
    }

    [Fact]
    public async Task Structured_reply_is_acknowledged_once()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply, "x"u8);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.StructuredReply);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.StructuredReply);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);

        // With structured replies on, GO advertises DF.
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("mem", []).ToBytes());
        var go = await client.ReadOptionRepliesAsync(NbdOption.Go);
        Assert.True(InfoReplies.TryReadExport(go[0].Data, out _, out var flags));
        Assert.True(flags.HasFlag(TransmissionFlags.SendDf));
    }

    [Fact]
    public async Task Meta_contexts_need_structured_replies()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("mem", [MetaContexts.BaseAllocation]).ToBytes());
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.ListMetaContext, new MetaContextRequest("mem", []).ToBytes());
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
    }

    [Theory]
    [InlineData(new string[0], true)]
    [InlineData(new[] { "base:" }, true)]
    [InlineData(new[] { "base:allocation" }, true)]
    [InlineData(new[] { "base:nonexistent" }, false)]
    [InlineData(new[] { "qemu:dirty-bitmap:x", "x-foo:bar" }, false)]
    public async Task List_meta_context_matches_queries(string[] queries, bool expectAllocation)
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply);
        await client.ReadOptionReplyAsync();
        await client.SendOptionAsync(NbdOption.ListMetaContext, new MetaContextRequest("mem", queries).ToBytes());
        var replies = await client.ReadOptionRepliesAsync(NbdOption.ListMetaContext);
        Assert.Equal(OptionReplyType.Ack, replies[^1].Header.Type);
        var contexts = replies.SkipLast(1).Select(r =>
        {
            Assert.True(MetaContextReply.TryParse(r.Data, out var id, out var name));
            Assert.Equal(0u, id);
            return name;
        }).ToList();
        Assert.Equal(expectAllocation ? [MetaContexts.BaseAllocation] : Array.Empty<string>(), contexts);
    }

    [Fact]
    public async Task Set_meta_context_selects_allocation_with_a_nonzero_id_and_ignores_base_wildcard()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply);
        await client.ReadOptionReplyAsync();

        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("mem", ["base:"]).ToBytes());
        var wildcard = await client.ReadOptionRepliesAsync(NbdOption.SetMetaContext);
        Assert.Single(wildcard);

        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("mem", [MetaContexts.BaseAllocation, MetaContexts.BaseAllocation, "x-other:thing"]).ToBytes());
        var replies = await client.ReadOptionRepliesAsync(NbdOption.SetMetaContext);
        Assert.Equal(2, replies.Count);
        Assert.True(MetaContextReply.TryParse(replies[0].Data, out var id, out var name));
        Assert.NotEqual(0u, id);
        Assert.Equal(MetaContexts.BaseAllocation, name);
    }

    [Fact]
    public async Task Meta_context_query_without_namespace_is_invalid_and_unknown_export_is_unknown()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply);
        await client.ReadOptionReplyAsync();
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("mem", ["allocation"]).ToBytes());
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("nope", [MetaContexts.BaseAllocation]).ToBytes());
        Assert.Equal(OptionReplyType.ErrorUnknown, (await client.ReadOptionReplyAsync()).Header.Type);
        var truncated = new MetaContextRequest("mem", [MetaContexts.BaseAllocation]).ToBytes()[..^3];
        await client.SendOptionAsync(NbdOption.SetMetaContext, truncated);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
    }

    [Fact]
    public async Task Block_status_is_refused_when_the_context_was_set_for_another_export()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply);
        await client.ReadOptionReplyAsync();
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("ro", [MetaContexts.BaseAllocation]).ToBytes());
        await client.ReadOptionRepliesAsync(NbdOption.SetMetaContext);
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("mem", []).ToBytes());
        await client.ReadOptionRepliesAsync(NbdOption.Go);

        await client.SendRequestAsync(NbdCommand.BlockStatus, 5, 0, 4096);
        var reply = await client.ReadReplyAsync();
        Assert.Equal(NbdError.InvalidArgument, reply.AnyError);
    }

    [Fact]
    public async Task A_failed_set_meta_context_forgets_the_previous_selection()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply);
        await client.ReadOptionReplyAsync();
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("mem", [MetaContexts.BaseAllocation]).ToBytes());
        await client.ReadOptionRepliesAsync(NbdOption.SetMetaContext);
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("nope", [MetaContexts.BaseAllocation]).ToBytes());
        Assert.Equal(OptionReplyType.ErrorUnknown, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("mem", []).ToBytes());
        await client.ReadOptionRepliesAsync(NbdOption.Go);
        await client.SendRequestAsync(NbdCommand.BlockStatus, 5, 0, 4096);
        Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);
    }

    [Fact]
    public async Task Oversized_known_option_is_too_big_and_stays_in_step()
    {
        await using var harness = new ServerHarness(options => options.MaxOptionDataLength = 1024);
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.Info, new byte[5000]);
        Assert.Equal(OptionReplyType.ErrorTooBig, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.StructuredReply);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
    }

    [Fact]
    public async Task A_client_that_never_finishes_negotiating_is_dropped_at_the_timeout()
    {
        await using var harness = new ServerHarness(options => options.HandshakeTimeout = TimeSpan.FromMilliseconds(300));
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendRawAsync(Convert.FromHexString("49484156")); // half an option header, then silence
        Assert.True(await client.WaitForCloseAsync(TimeSpan.FromSeconds(10)));
        await harness.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "memory-peer", "handshake not finished");
    }

    [Fact]
    public async Task Too_many_options_is_treated_as_abuse()
    {
        await using var harness = new ServerHarness(options => options.MaxOptionsPerConnection = 5);
        await using var client = harness.Connect();
        await client.StartAsync();
        for (var i = 0; i < 5; i++)
        {
            await client.SendOptionAsync((NbdOption)0x999);
            Assert.Equal(OptionReplyType.ErrorUnsupported, (await client.ReadOptionReplyAsync()).Header.Type);
        }

        await client.SendOptionAsync((NbdOption)0x999);
        Assert.True(await client.WaitForCloseAsync());
    }

    [Fact]
    public async Task Garbage_instead_of_an_option_closes_only_that_connection()
    {
        await using var harness = new ServerHarness();
        await using (var bad = harness.Connect())
        {
            await bad.StartAsync();
            await bad.SendRawAsync(new byte[64]);
            Assert.True(await bad.WaitForCloseAsync());
        }

        var (good, _, _) = await harness.OpenAsync();
        await using (good)
        {
            await good.SendRequestAsync(NbdCommand.Flush, 1, 0, 0);
            Assert.Equal(NbdError.None, (await good.ReadReplyAsync()).AnyError);
        }
    }

    [Fact]
    public async Task Options_during_shutdown_get_shutdown_and_abort_is_still_acknowledged()
    {
        await using var harness = new ServerHarness();
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.List);
        await client.ReadOptionRepliesAsync(NbdOption.List);
        var stop = harness.Server.StopAsync();

        // The stopping server closes idle handshakes; whatever it answered before closing must be well formed.
        Assert.True(await client.WaitForCloseAsync(TimeSpan.FromSeconds(10)));
        await stop;
    }
}
