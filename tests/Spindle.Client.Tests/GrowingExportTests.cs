using Spindle.Protocol;
using Spindle.Server;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// An export that grows (or shrinks) while served, as an RBD image resized online does: Spindle's server in process
/// over a device whose size the test changes. Open connections keep the size they negotiated; new ones and the
/// client library after reconnecting get the larger size; a smaller one is still refused by the client.
/// </summary>
public sealed class GrowingExportTests
{
    private const long Small = 1 << 20;
    private const long Large = 3 << 20;
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    private static NbdClientOptions Fast(int connections = 1) => new()
    {
        Connections = connections,
        ReconnectDelay = TimeSpan.FromMilliseconds(10),
        MaxReconnectDelay = TimeSpan.FromMilliseconds(100),
        DeadConnectionTimeout = TimeSpan.FromSeconds(20),
    };

    [Fact]
    public async Task An_open_connection_keeps_its_negotiated_size_and_a_new_one_gets_the_grown_size()
    {
        var device = new ResizableMemoryDevice(Small, Large);
        await using var server = await TestServer.StartAsync(device);
        await using var old = await RawNbdClient.ConnectAsync(server.EndPoint);
        var (oldSize, _) = await old.NegotiateAsync();
        Assert.Equal((ulong)Small, oldSize);

        device.Resize(Large);

        // The old connection was never told: the server holds it to its own size, and it goes on working.
        await old.SendRequestAsync(NbdCommand.Read, 1, Small - 4096, 4096);
        Assert.Equal(NbdError.None, (await old.ReadStructuredReplyAsync(1))[^1].AnyError);
        await old.SendRequestAsync(NbdCommand.Read, 2, Small, 4096);
        var past = await old.ReadStructuredReplyAsync(2);
        Assert.Equal(NbdError.InvalidArgument, past[^1].AnyError);
        Assert.Contains($"beyond the end of the export ({Small} bytes)", past[^1].ErrorMessage, StringComparison.Ordinal);
        await old.SendRequestAsync(NbdCommand.Write, 3, Small, 512, payload: new byte[512]);
        Assert.Equal(NbdError.NoSpace, (await old.ReadStructuredReplyAsync(3))[^1].AnyError);
        await old.SendRequestAsync(NbdCommand.Read, 4, 0, 512);
        Assert.Equal(NbdError.None, (await old.ReadStructuredReplyAsync(4))[^1].AnyError);

        // A new connection negotiates the new size and may use all of it.
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        Assert.Equal(Large, client.Size);
        var data = Patterns.Generate(Large - 8192, 8192, seed: 4);
        await client.WriteAsync(Large - 8192, data, Token);
        var back = new byte[8192];
        await client.ReadAsync(Large - 8192, back, Token);
        Assert.Equal(data, back);
    }

    [Fact]
    public async Task A_shrink_fails_requests_past_the_new_end_of_an_open_connection_and_nothing_else()
    {
        var device = new ResizableMemoryDevice(Small, Large);
        await using var server = await TestServer.StartAsync(device);
        await using var old = await RawNbdClient.ConnectAsync(server.EndPoint);
        await old.NegotiateAsync();

        device.Resize(Small / 2);
        await old.SendRequestAsync(NbdCommand.Read, 1, Small / 2, 4096);
        var past = await old.ReadStructuredReplyAsync(1);
        Assert.Equal(NbdError.InvalidArgument, past[^1].AnyError);
        Assert.Contains($"shrank from {Small} to {Small / 2} bytes", past[^1].ErrorMessage, StringComparison.Ordinal);
        await old.SendRequestAsync(NbdCommand.Read, 2, 0, 4096);
        Assert.Equal(NbdError.None, (await old.ReadStructuredReplyAsync(2))[^1].AnyError);

        await using var fresh = await RawNbdClient.ConnectAsync(server.EndPoint);
        var (size, _) = await fresh.NegotiateAsync();
        Assert.Equal((ulong)(Small / 2), size);
    }

    [Fact]
    public async Task The_client_takes_the_larger_size_after_reconnecting_and_uses_it()
    {
        var device = new ResizableMemoryDevice(Small, Large);
        await using var server = await TestServer.StartAsync(device);
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(), Token);
        var data = Patterns.Generate(0, 4096, seed: 8);
        await client.WriteAsync(0, data, Token);
        var changes = new List<ExportSizeChangedEventArgs>();
        client.SizeChanged += (_, change) =>
        {
            lock (changes)
            {
                changes.Add(change);
            }
        };

        device.Resize(Large);
        Assert.Equal(Small, client.Size);
        Assert.True(server.Server.DisconnectAll() > 0);

        // The next request waits for the reconnection, which brings the larger size.
        var back = new byte[4096];
        await client.ReadAsync(0, back, Token).AsTask().WaitAsync(Bound, Token);
        Assert.Equal(data, back);
        Assert.True(client.Reconnections >= 1);
        Assert.Equal(Large, client.Size);
        Assert.Equal(Large, client.Export.Size);
        lock (changes)
        {
            var change = Assert.Single(changes);
            Assert.Equal(Small, change.OldSize);
            Assert.Equal(Large, change.NewSize);
        }

        // Past the old end, through the client and through the NbdBlockDevice that mounts use.
        var tail = Patterns.Generate(Large - 65536, 65536, seed: 9);
        await client.WriteAsync(Large - 65536, tail, Token);
        var device2 = new NbdBlockDevice(client);
        Assert.Equal(Large, device2.Size);
        var readBack = new byte[65536];
        await device2.ReadAsync(Large - 65536, readBack, Token);
        Assert.Equal(tail, readBack);
    }

    [Fact]
    public async Task With_several_connections_the_client_grows_only_once_every_one_has_the_larger_size()
    {
        var device = new ResizableMemoryDevice(Small, Large);
        await using var server = await TestServer.StartAsync(device);
        await using var client = await NbdClient.ConnectAsync(server.Uri(), Fast(connections: 2), Token);
        Assert.Equal(2, client.ConnectionCount);

        device.Resize(Large);
        Assert.True(server.Server.Disconnect(server.Server.Connections[0].Id));
        await WaitAsync(() => client.Reconnections >= 1 && client.ConnectionCount == 2);

        // One connection still has the old size: a request past it could land there and be refused.
        Assert.Equal(Small, client.Size);

        server.Server.DisconnectAll();
        await WaitAsync(() => client.Size == Large);
        var data = Patterns.Generate(Small, 4096, seed: 5);
        await client.WriteAsync(Small, data, Token);
        var back = new byte[4096];
        await client.ReadAsync(Small, back, Token);
        Assert.Equal(data, back);
    }

    [Fact]
    public async Task A_server_that_comes_back_smaller_is_still_refused()
    {
        var device = new ResizableMemoryDevice(Small, Large);
        var options = Fast();
        options.DeadConnectionTimeout = TimeSpan.FromSeconds(2);
        await using var server = await TestServer.StartAsync(device);
        await using var client = await NbdClient.ConnectAsync(server.Uri(), options, Token);

        device.Resize(Small / 2);
        server.Server.DisconnectAll();
        var error = await Assert.ThrowsAsync<NbdConnectionException>(() => client.ReadAsync(0, new byte[512], Token).AsTask().WaitAsync(Bound, Token));
        Assert.Contains($"size {Small / 2} instead of {Small}", error.Message, StringComparison.Ordinal);
        Assert.Equal(Small, client.Size);
    }

    /// <summary>Polls <paramref name="condition"/> until it holds, for at most <see cref="Bound"/>.</summary>
    private static async Task WaitAsync(Func<bool> condition)
    {
        var deadline = DateTime.UtcNow + Bound;
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, "the condition did not hold within the bound");
            await Task.Delay(20, Token);
        }
    }
}
