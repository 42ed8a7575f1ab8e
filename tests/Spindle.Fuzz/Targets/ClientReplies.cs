using Spindle.Client;
using Spindle.Fuzz.Support;
using Spindle.Protocol;
using Spindle.Wire;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The client's reply reader (simple replies, structured chunks, and extended chunks once the client negotiates
/// extended headers): a real <see cref="NbdClient"/> negotiates with <see cref="ScriptedServer"/>, sends the requests of
/// <see cref="ClientScript"/> (cookies 1, 2, ...), and then reads the input as the server's replies; the server then
/// closes. The input is <c>u8 script | reply bytes</c>: the script byte says what the server agrees to
/// (<see cref="ServerScript"/>: extended headers when the client offers them, structured replies, a 512-byte minimum
/// block). Invariant: every request ends, within <see cref="Bounded.Limit"/>, in success or an NbdException (a server
/// error, a protocol violation, a lost connection), never another exception type; the client closes within the bound.
/// </summary>
[Covers(typeof(Client.Connection.NbdConnection), "ReadLoopAsync")]
[Covers(typeof(Client.Connection.NbdConnection), "ReadChunkAsync")]
[Covers(typeof(Client.Connection.NbdConnection), "ReadBlockStatusAsync")]
public sealed class ClientReplies : FuzzTarget
{
    public override void Run(byte[] input)
    {
        if (input.Length == 0)
        {
            return;
        }

        _ = Exchange((ServerScript)input[0], input.AsMemory(1));
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var data = new byte[4096];
        yield return ("simple", [(byte)ServerScript.None, .. new WireBuilder()
            .SimpleReply(1).Bytes(data).SimpleReply(2).Bytes(data.AsSpan(0, 1024)).SimpleReply(3).SimpleReply(4).SimpleReply(5, NbdError.NoSpace).ToArray()]);
        yield return ("structured", [(byte)ServerScript.StructuredReplies, .. new WireBuilder()
            .Chunk(ReplyType.OffsetHole, 2, new WireBuilder().U64(65536).U32(1024).ToArray(), done: false)
            .Chunk(ReplyType.OffsetData, 1, new WireBuilder().U64(0).Bytes(data.AsSpan(0, 2048)).ToArray(), done: false)
            .Chunk(ReplyType.OffsetHole, 1, new WireBuilder().U64(2048).U32(2048).ToArray())
            .Chunk(ReplyType.None, 2, [])
            .Chunk(ReplyType.BlockStatus, 4, new WireBuilder().U32(ScriptedServer.BaseAllocationId).U32(65536).U32(3).U32(983040).U32(0).ToArray())
            .SimpleReply(3)
            .Chunk(ReplyType.ErrorOffset, 5, new WireBuilder().U32((uint)NbdError.IO).U16(3).Bytes("bad"u8).U64(1024).ToArray())
            .Chunk(ReplyType.Error, 6, new WireBuilder().U32((uint)NbdError.NotSupported).U16(0).ToArray()).ToArray()]);
        yield return ("structured-unknown-error-chunk", [(byte)(ServerScript.StructuredReplies | ServerScript.MinimumBlock512), .. new WireBuilder()
            .Chunk((ReplyType)0x8123, 1, new WireBuilder().U32(5).U16(0).ToArray())
            .Chunk(ReplyType.Error, 2, new WireBuilder().U32((uint)NbdError.Shutdown).U16(0).ToArray()).ToArray()]);
        yield return ("extended", [(byte)(ServerScript.ExtendedHeaders | ServerScript.StructuredReplies), .. new WireBuilder()
            .ExtendedChunk(ReplyType.OffsetData, 1, 0, new WireBuilder().U64(0).Bytes(data).ToArray())
            .ExtendedChunk(ReplyType.OffsetHole, 2, 65536, new WireBuilder().U64(65536).U32(1024).ToArray())
            .ExtendedChunk(ReplyType.None, 3, 8192, [])
            .ExtendedChunk(ReplyType.BlockStatusExtended, 4, 0,
                new WireBuilder().U32(ScriptedServer.BaseAllocationId).U32(2).U64(4096).U64(3).U64(1 << 19).U64(0).ToArray())
            .ExtendedChunk(ReplyType.None, 5, 0, [])
            .ExtendedChunk(ReplyType.Error, 6, 16384, new WireBuilder().U32((uint)NbdError.IO).U16(0).ToArray()).ToArray()]);
    }

    /// <summary>One run: negotiate, send the script's requests, answer with <paramref name="replies"/>, close.</summary>
    /// <returns>Every byte the scripted server sent (the seeds of <see cref="ClientNegotiation"/> come from here).</returns>
    internal static byte[] Exchange(ServerScript script, ReadOnlyMemory<byte> replies, bool listAndIdentify = false)
    {
        byte[] sent = [];
        Bounded.Run(async token =>
        {
            var (clientEnd, serverEnd) = InMemoryDuplex.CreatePair();
            var server = new ScriptedServer(serverEnd, script);
            var negotiated = server.NegotiateAsync(token);
            NbdClient client;
            try
            {
                client = await NbdClient.ConnectAsync(ClientHarness.Uri, ClientHarness.Options(clientEnd, listAndIdentify), token).ConfigureAwait(false);
            }
            catch (NbdException exception)
            {
                throw new InvariantViolation($"the client refused the scripted handshake: {exception.Message}", exception);
            }

            await using (client.ConfigureAwait(false))
            {
                await negotiated.ConfigureAwait(false);
                var requests = ClientScript.Start(client, token);
                await server.ReadRequestsAsync(requests.Count, token).ConfigureAwait(false);
                await server.SendAsync(replies, token).ConfigureAwait(false);
                await serverEnd.DisposeAsync().ConfigureAwait(false);
                var drained = server.DrainAsync(token);
                foreach (var (request, index) in requests.Select((request, index) => (request, index)))
                {
                    await Bounded.Within(request.ContinueWith(static _ => { }, TaskScheduler.Default), $"request {index + 1}", token).ConfigureAwait(false);
                    ClientScript.CheckOutcome(request, $"request {index + 1}");
                }

                await client.DisposeAsync().ConfigureAwait(false);
                await Bounded.Within(drained, "the client's close", token).ConfigureAwait(false);
            }

            sent = server.Sent;
        }, "a client connection");
        return sent;
    }
}
