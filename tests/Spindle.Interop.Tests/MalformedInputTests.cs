using System.Buffers.Binary;
using System.Net.Sockets;
using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// Hostile and broken clients over real TCP sockets. After each one, a fresh client must still be served and a
/// bystander connection opened before the attack must still work: nothing crashes, nothing else is disturbed.
/// </summary>
public sealed class MalformedInputTests
{
    public static TheoryData<string> Attacks => new(
        "garbage before the greeting",
        "truncated client flags",
        "unknown client flags",
        "half an option header",
        "option claiming 4 GiB of data, then close",
        "wrong option magic",
        "huge unknown option",
        "info with lying name length",
        "export name of 5000 bytes",
        "bad request magic",
        "unknown command with a huge length",
        "write header without its payload",
        "write over the limit, then close",
        "disconnect with a payload",
        "hundreds of requests then reset");

    [Theory]
    [MemberData(nameof(Attacks))]
    public async Task Server_survives_and_others_are_undisturbed(string attack)
    {
        await using var server = await InteropServer.StartAsync();
        await using var bystander = await RawNbdClient.ConnectAsync(server.Server.EndPoint);
        await bystander.NegotiateAsync("mem");
        await bystander.SendRequestAsync(NbdCommand.Write, 1, 0, 4096, CommandFlags.None, Patterns.Generate(0, 4096));
        Assert.Equal(NbdError.None, (await bystander.ReadReplyAsync()).AnyError);

        await RunAttackAsync(server, attack);

        // The attacker's connection is gone from the server too (no request or buffer left hanging).
        for (var i = 0; i < 500 && server.Server.Server.ConnectionCount > 1; i++)
        {
            await Task.Delay(20);
        }

        Assert.Equal(1, server.Server.Server.ConnectionCount);

        // A new client is served...
        await using (var fresh = await RawNbdClient.ConnectAsync(server.Server.EndPoint))
        {
            await fresh.NegotiateAsync("mem");
            await fresh.SendRequestAsync(NbdCommand.Read, 2, 0, 4096);
            Assert.Equal(Patterns.Generate(0, 4096), RawNbdClient.Reassemble(await fresh.ReadStructuredReplyAsync(2), 0, 4096));
        }

        // ...and the connection that was open all along still works.
        await bystander.SendRequestAsync(NbdCommand.Read, 3, 0, 4096);
        Assert.Equal(Patterns.Generate(0, 4096), RawNbdClient.Reassemble(await bystander.ReadStructuredReplyAsync(3), 0, 4096));
    }

    private static async Task RunAttackAsync(InteropServer server, string attack)
    {
        using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(server.Server.EndPoint);
        var stream = new NetworkStream(socket);
        var client = new RawNbdClient(stream, socket) { Timeout = TimeSpan.FromSeconds(15) };
        switch (attack)
        {
            case "garbage before the greeting":
                await client.SendRawAsync(Patterns.Random(10_000, 1));
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "truncated client flags":
                await client.ReadGreetingAsync();
                await client.SendRawAsync([0, 0]);
                socket.Shutdown(SocketShutdown.Send);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "unknown client flags":
                await client.ReadGreetingAsync();
                await client.SendClientFlagsAsync((ClientFlags)0xffffffff);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "half an option header":
                await client.StartAsync();
                await client.SendRawAsync(Convert.FromHexString("4948415645"));
                socket.Shutdown(SocketShutdown.Send);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "option claiming 4 GiB of data, then close":
                await client.StartAsync();
                await client.SendOptionAsync((NbdOption)77, 0xfffffff0, new byte[1000]);
                socket.Shutdown(SocketShutdown.Send);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "wrong option magic":
                await client.StartAsync();
                await client.SendRawAsync(Patterns.Random(16, 2));
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "huge unknown option":
                await client.StartAsync();
                await client.SendOptionAsync((NbdOption)0x12345, Patterns.Random(1 << 20, 3));
                Assert.Equal(OptionReplyType.ErrorUnsupported, (await client.ReadOptionReplyAsync()).Header.Type);
                break;
            case "info with lying name length":
                await client.StartAsync();
                var lying = new byte[20];
                BinaryPrimitives.WriteUInt32BigEndian(lying, 0xffffffff);
                await client.SendOptionAsync(NbdOption.Info, lying);
                Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
                await client.SendOptionAsync(NbdOption.Abort);
                Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
                break;
            case "export name of 5000 bytes":
                await client.StartAsync();
                await client.SendOptionAsync(NbdOption.ExportName, new byte[5000]);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "bad request magic":
                await client.NegotiateAsync("mem");
                await client.SendRawAsync(Patterns.Random(28, 4));
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "unknown command with a huge length":
                await client.NegotiateAsync("mem");
                await client.SendRequestAsync((NbdCommand)0xffff, 9, 0, 0xffffffff);
                Assert.Equal(NbdError.InvalidArgument, (await client.ReadReplyAsync()).AnyError);
                break;
            case "write header without its payload":
                await client.NegotiateAsync("mem");
                await client.SendRequestAsync(NbdCommand.Write, 10, 8192, 4096, CommandFlags.None, new byte[100]);
                socket.Shutdown(SocketShutdown.Send);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "write over the limit, then close":
                await client.NegotiateAsync("mem");
                await client.SendRequestAsync(NbdCommand.Write, 11, 0, 0xfffffff0, CommandFlags.None, new byte[65536]);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "disconnect with a payload":
                await client.NegotiateAsync("mem");
                await client.SendRequestAsync(NbdCommand.Disconnect, 12, 123, 456, CommandFlags.None, new byte[456]);
                Assert.True(await client.WaitForCloseAsync());
                break;
            case "hundreds of requests then reset":
                await client.NegotiateAsync("mem");
                var burst = new List<byte>();
                for (var i = 0; i < 300; i++)
                {
                    var header = new byte[28];
                    new NbdRequest(CommandFlags.None, NbdCommand.Read, (ulong)i, (ulong)i * 65536, 65536).WriteTo(header);
                    burst.AddRange(header);
                }

                await client.SendRawAsync([.. burst]);
                socket.LingerState = new LingerOption(true, 0);
                socket.Close();
                break;
            default:
                Assert.Fail("unknown attack " + attack);
                break;
        }
    }
}
