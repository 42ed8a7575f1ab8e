using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>The client against Spindle's own server, in process, over TCP and a Unix socket.</summary>
public sealed class ClientAgainstSpindleTests
{
    private static CancellationToken Token => TestContext.Current.CancellationToken;

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Negotiates_and_reads_back_what_it_wrote(bool unix)
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(8 << 20), "disk");
        await using var client = await NbdClient.ConnectAsync(unix ? server.UnixUri("disk") : server.Uri("disk"), cancellationToken: Token);

        Assert.Equal(8 << 20, client.Size);
        Assert.True(client.Export.StructuredReplies);
        Assert.Equal(NegotiationMethod.Go, client.Export.Method);
        Assert.True(client.Export.CanBlockStatus);
        Assert.True(client.Export.CanFlush);
        Assert.False(client.Export.IsReadOnly);

        var data = Patterns.Generate(65536, 200_000);
        await client.WriteAsync(65536, data, Token);
        var back = new byte[data.Length];
        await client.ReadAsync(65536, back, Token);
        Assert.Equal(data, back);
        await client.FlushAsync(Token);
    }
}
