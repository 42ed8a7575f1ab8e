using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>The client library against Spindle's own server, in process, over TCP and a Unix socket.</summary>
public sealed class ClientAgainstSpindleTests
{
    private const int Size = 8 << 20;

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Negotiates_and_reads_back_what_it_wrote(bool unix)
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(Size), "disk", description: "a test disk");
        await using var client = await NbdClient.ConnectAsync(unix ? server.UnixUri("disk") : server.Uri("disk"), cancellationToken: Token);

        Assert.Equal(Size, client.Size);
        Assert.True(client.Export.FixedNewstyle);
        Assert.True(client.Export.StructuredReplies);
        Assert.Equal(NegotiationMethod.Go, client.Export.Method);
        Assert.True(client.Export.CanBlockStatus);
        Assert.True(client.Export.CanFlush && client.Export.CanFua && client.Export.CanTrim && client.Export.CanWriteZeroes);
        Assert.True(client.Export.CanFastZero && client.Export.CanCache && client.Export.CanMultiConn && client.Export.CanDontFragment);
        Assert.False(client.Export.IsReadOnly);
        Assert.Equal("a test disk", client.Export.Description);
        Assert.NotNull(client.Export.AdvertisedBlockSizes);

        var data = Patterns.Generate(65536, 200_000);
        await client.WriteAsync(65536, data, Token);
        var back = new byte[data.Length];
        await client.ReadAsync(65536, back, Token);
        Assert.Equal(data, back);
        await client.FlushAsync(Token);
    }

    [Fact]
    public async Task Every_command_does_what_it_says()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(Size));
        await using var client = await NbdClient.ConnectAsync(server.Uri(), cancellationToken: Token);
        var data = Patterns.Generate(0, 1 << 20, seed: 7);
        await client.WriteAsync(0, data, CommandFlags.Fua, Token);

        await client.WriteZeroesAsync(65536, 65536, CommandFlags.NoHole, Token);
        await client.WriteZeroesAsync(262144, 131072, CommandFlags.FastZero, Token);
        await client.TrimAsync(524288, 65536, CommandFlags.Fua, Token);
        await client.CacheAsync(0, 1 << 20, Token);
        await client.FlushAsync(Token);

        var back = new byte[1 << 20];
        await client.ReadAsync(0, back, Token);
        Assert.Equal(data.AsSpan(0, 65536).ToArray(), back.AsSpan(0, 65536).ToArray());
        Assert.All(back.AsSpan(65536, 65536).ToArray(), b => Assert.Equal(0, b));
        Assert.All(back.AsSpan(262144, 131072).ToArray(), b => Assert.Equal(0, b));
        Assert.Equal(data.AsSpan(131072, 131072).ToArray(), back.AsSpan(131072, 131072).ToArray());

        // DF: one unfragmented chunk, same bytes.
        var small = new byte[4096];
        await client.ReadAsync(0, small, CommandFlags.DontFragment, Token);
        Assert.Equal(data.AsSpan(0, 4096).ToArray(), small);

        // The memory backend frees zeroed chunks: block status sees data, holes and zeroes.
        var extents = new List<NbdExtent>();
        await foreach (var extent in client.GetExtentsAsync(0, Size, cancellationToken: Token))
        {
            extents.Add(extent);
        }

        Assert.Equal(0, extents[0].Offset);
        Assert.Equal(Size, extents.Sum(e => e.Length));
        Assert.False(extents[0].IsHole);
        Assert.Contains(extents, e => e.IsZero && e.Offset <= 65536 && e.End >= 131072);
        Assert.True(extents[^1].IsHole && extents[^1].IsZero);

        var one = await client.GetBlockStatusAsync(0, Size, flags: CommandFlags.RequestOne, cancellationToken: Token);
        Assert.Single(one.Extents);
    }

    [Fact]
    public async Task Many_requests_in_flight_on_several_connections_keep_every_byte()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(Size));
        var options = new NbdClientOptions { Connections = 4, MaxRequestsInFlight = 16 };
        await using var client = await NbdClient.ConnectAsync(server.Uri(), options, Token);
        Assert.Equal(4, client.ConnectionCount);

        // 512 writes of 16 KiB each, all at once, then all read back at once.
        const int Block = 16384;
        var writes = Enumerable.Range(0, Size / Block)
            .Select(i => client.WriteAsync((long)i * Block, Patterns.Generate((long)i * Block, Block, seed: 3), Token).AsTask())
            .ToArray();
        await Task.WhenAll(writes);
        await client.FlushAsync(Token);
        Assert.Equal(0, client.UnacknowledgedCount);

        var buffers = Enumerable.Range(0, Size / Block).Select(_ => new byte[Block]).ToArray();
        await Task.WhenAll(buffers.Select((buffer, i) => client.ReadAsync((long)i * Block, buffer, Token).AsTask()));
        for (var i = 0; i < buffers.Length; i++)
        {
            Assert.Equal(Patterns.Generate((long)i * Block, Block, seed: 3), buffers[i]);
        }
    }

    [Fact]
    public async Task Requests_are_checked_before_they_are_sent()
    {
        var device = new MemoryBlockDevice(Size);
        await using var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "aligned", BlockSizes = new BlockSizeConstraints(512, 4096, 1 << 20), Trim = false }, device));
            catalog.Add(new Export(new ExportOptions { Name = "ro", ReadOnly = true, Flush = false }, new MemoryBlockDevice(Size)));
        });
        await using var aligned = await NbdClient.ConnectAsync(server.Uri("aligned"), cancellationToken: Token);
        Assert.Equal(512u, aligned.Export.MinimumBlockSize);
        Assert.Equal(1 << 20, aligned.Export.MaximumPayload);

        var past = await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => aligned.ReadAsync(Size - 512, new byte[1024], Token).AsTask());
        Assert.Contains("reaches past the end of export 'aligned' (8388608 bytes)", past.Message, StringComparison.Ordinal);
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => aligned.WriteZeroesAsync(-512, 512, cancellationToken: Token).AsTask());
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => aligned.WriteAsync(long.MaxValue - 10, new byte[512], Token).AsTask());
        var misaligned = await Assert.ThrowsAsync<ArgumentException>(() => aligned.ReadAsync(100, new byte[512], Token).AsTask());
        Assert.Contains("not aligned to the export's minimum block size of 512 bytes", misaligned.Message, StringComparison.Ordinal);
        await Assert.ThrowsAsync<ArgumentException>(() => aligned.WriteAsync(0, new byte[100], Token).AsTask());
        var big = await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => aligned.ReadAsync(0, new byte[2 << 20], Token).AsTask());
        Assert.Contains("maximum payload of 1048576 bytes", big.Message, StringComparison.Ordinal);
        var trim = await Assert.ThrowsAsync<NotSupportedException>(() => aligned.TrimAsync(0, 4096, cancellationToken: Token).AsTask());
        Assert.Contains("NBD_FLAG_SEND_TRIM", trim.Message, StringComparison.Ordinal);
        var flags = await Assert.ThrowsAsync<ArgumentException>(() => aligned.ReadAsync(0, new byte[512], CommandFlags.Fua, Token).AsTask());
        Assert.Contains("READ does not take flags Fua", flags.Message, StringComparison.Ordinal);
        await Assert.ThrowsAsync<ArgumentException>(() => aligned.WriteAsync(0, new byte[512], CommandFlags.NoHole, Token).AsTask());
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => aligned.GetBlockStatusAsync(0, 0, cancellationToken: Token));
        var context = await Assert.ThrowsAsync<NotSupportedException>(() => aligned.GetBlockStatusAsync(0, 512, "qemu:dirty-bitmap:x", cancellationToken: Token));
        Assert.Contains("did not agree to meta context 'qemu:dirty-bitmap:x'", context.Message, StringComparison.Ordinal);

        // Nothing above reached the server: the connection is untouched and works.
        Assert.Equal(0, aligned.UnacknowledgedCount);
        await aligned.WriteAsync(512, new byte[512], Token);
        await aligned.ReadAsync(0, Memory<byte>.Empty, Token);

        await using var readOnly = await NbdClient.ConnectAsync(server.Uri("ro"), cancellationToken: Token);
        Assert.True(readOnly.Export.IsReadOnly);
        var write = await Assert.ThrowsAsync<NotSupportedException>(() => readOnly.WriteAsync(0, new byte[512], Token).AsTask());
        Assert.Contains("export 'ro' is read-only", write.Message, StringComparison.Ordinal);
        await Assert.ThrowsAsync<NotSupportedException>(() => readOnly.WriteZeroesAsync(0, 512, cancellationToken: Token).AsTask());
        await Assert.ThrowsAsync<NotSupportedException>(() => readOnly.FlushAsync(Token).AsTask());
        await readOnly.ReadAsync(0, new byte[512], Token);
    }

    [Fact]
    public async Task Backend_failures_come_back_as_server_errors_and_the_connection_survives()
    {
        await using var server = await TestServer.StartAsync(new FailingDevice(Size, failFrom: 1 << 20));
        await using var client = await NbdClient.ConnectAsync(server.Uri(), cancellationToken: Token);
        var read = await Assert.ThrowsAsync<NbdServerErrorException>(() => client.ReadAsync(1 << 20, new byte[4096], Token).AsTask());
        Assert.Equal(NbdError.IO, read.Error);
        Assert.Equal(NbdCommand.Read, read.Command);
        var write = await Assert.ThrowsAsync<NbdServerErrorException>(() => client.WriteAsync(2 << 20, new byte[4096], Token).AsTask());
        Assert.Equal(NbdError.NoSpace, write.Error);
        Assert.Contains("ENOSPC", write.Message, StringComparison.Ordinal);

        var data = Patterns.Generate(0, 4096);
        await client.WriteAsync(0, data, Token);
        var back = new byte[4096];
        await client.ReadAsync(0, back, Token);
        Assert.Equal(data, back);
    }

    /// <summary>Memory that fails reads (EIO) and writes (ENOSPC) from an offset on, as a broken disk would.</summary>
    private sealed class FailingDevice(long size, long failFrom) : BlockDevice
    {
        private readonly MemoryBlockDevice _memory = new(size);

        public override long Size => size;

        public override BlockDeviceFeatures Features => _memory.Features;

        public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
            offset >= failFrom ? throw new BlockDeviceException(NbdError.IO, "the platter fell off") : _memory.ReadAsync(offset, destination, cancellationToken);

        public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
            offset >= failFrom ? throw new BlockDeviceException(NbdError.NoSpace, "full") : _memory.WriteAsync(offset, source, fua, cancellationToken);

        public override ValueTask FlushAsync(CancellationToken cancellationToken) => _memory.FlushAsync(cancellationToken);
    }

    [Fact]
    public async Task Lists_exports_with_their_details()
    {
        await using var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "one", Description = "first" }, new MemoryBlockDevice(1 << 20)));
            catalog.Add(new Export(new ExportOptions { Name = "two", ReadOnly = true }, new MemoryBlockDevice(2 << 20)));
        });
        var listings = await NbdClient.ListExportsAsync(NbdUri.Parse(server.Uri()), cancellationToken: Token);
        Assert.Equal(["one", "two"], listings.Select(l => l.Name).Order());
        var one = listings.Single(l => l.Name == "one");
        Assert.Equal("first", one.Description);
        Assert.Equal(1 << 20, one.Info!.Size);
        var two = listings.Single(l => l.Name == "two");
        Assert.True(two.Info!.IsReadOnly);
        Assert.Equal(2 << 20, two.Info.Size);
    }

    [Fact]
    public async Task Unknown_export_and_refused_list_are_clear_errors()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(Size), "disk", configure: o => o.AllowList = false);
        var missing = await Assert.ThrowsAsync<NbdOptionException>(() => NbdClient.ConnectAsync(server.Uri("nope"), cancellationToken: Token));
        Assert.Equal(OptionReplyType.ErrorUnknown, missing.Reply);
        Assert.Contains("has no export named 'nope'", missing.Message, StringComparison.Ordinal);

        var list = await Assert.ThrowsAsync<NbdOptionException>(() => NbdClient.ListExportsAsync(NbdUri.Parse(server.Uri()), cancellationToken: Token));
        Assert.Contains("does not allow listing its exports", list.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Export_name_fallback_and_simple_replies_work_against_spindle()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(Size), "disk");
        var options = new NbdClientOptions { UseGo = false, StructuredReplies = false };
        await using var client = await NbdClient.ConnectAsync(server.Uri("disk"), options, Token);
        Assert.Equal(NegotiationMethod.ExportName, client.Export.Method);
        Assert.False(client.Export.StructuredReplies);
        Assert.False(client.Export.CanDontFragment);
        var data = Patterns.Generate(0, 100_000);
        await client.WriteAsync(4096, data, Token);
        var back = new byte[data.Length];
        await client.ReadAsync(4096, back, Token);
        Assert.Equal(data, back);
    }

    [Fact]
    public async Task Tls_uri_to_a_server_without_tls_is_refused_not_downgraded()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(Size));
        var error = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync($"nbds://127.0.0.1:{server.Port}/", cancellationToken: Token));
        Assert.Contains("does not offer TLS (NBD_OPT_STARTTLS answered NBD_REP_ERR_POLICY", error.Message, StringComparison.Ordinal);
        Assert.Contains("refusing to continue in plain text", error.Message, StringComparison.Ordinal);

        // TLS parameters on a plain URI are refused rather than silently ignored.
        var plain = await Assert.ThrowsAsync<NbdTlsException>(() => NbdClient.ConnectAsync($"nbd://127.0.0.1:{server.Port}/?tls-certificates=/etc", cancellationToken: Token));
        Assert.Contains("never uses TLS: write nbds://", plain.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Connection_refused_is_a_clear_error()
    {
        var port = PeerServer.FreePort();
        var error = await Assert.ThrowsAsync<NbdConnectionException>(() => NbdClient.ConnectAsync($"nbd://127.0.0.1:{port}/", cancellationToken: Token));
        Assert.Contains($"cannot connect to 127.0.0.1:{port}: connection refused", error.Message, StringComparison.Ordinal);
        var unix = await Assert.ThrowsAsync<NbdConnectionException>(() => NbdClient.ConnectAsync("nbd+unix:///?socket=/nonexistent/nbd.sock", cancellationToken: Token));
        Assert.Contains("cannot connect to unix:/nonexistent/nbd.sock", unix.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Server_stopping_mid_session_fails_requests_cleanly()
    {
        var server = await TestServer.StartAsync(new MemoryBlockDevice(Size));
        await using var client = await NbdClient.ConnectAsync(server.Uri(), new NbdClientOptions { DeadConnectionTimeout = TimeSpan.Zero }, Token);
        await client.WriteAsync(0, new byte[4096], Token);
        await server.DisposeAsync();
        var error = await Assert.ThrowsAnyAsync<NbdException>(() => client.ReadAsync(0, new byte[4096], Token).AsTask().WaitAsync(TimeSpan.FromSeconds(20), Token));
        Assert.True(error is NbdConnectionException or NbdServerErrorException { Error: NbdError.Shutdown }, error.ToString());
    }
}
