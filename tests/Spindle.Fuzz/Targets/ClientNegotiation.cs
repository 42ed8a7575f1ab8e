using Spindle.Client;
using Spindle.Fuzz.Support;
using Spindle.Wire;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The client's handshake parsing: the greeting, every option reply (ACK, SERVER, INFO with its payloads, META_CONTEXT,
/// errors), the EXPORT_NAME reply, and then one READ's reply. The input is everything the server says, from the first
/// byte; the server then closes. The client lists meta contexts and discovers identities, so every option reply kind
/// is asked for. Invariant: connecting ends, within <see cref="Bounded.Limit"/>, in a connected client or an
/// NbdException, never another exception type; a READ on a connected client likewise.
/// </summary>
[Covers(typeof(Client.Negotiation.ClientNegotiator), "StartAsync")]
[Covers(typeof(Client.Negotiation.ClientNegotiator), "InfoOrGoAsync")]
[Covers(typeof(Client.Negotiation.ClientNegotiator), "MetaContextAsync")]
public sealed class ClientNegotiation : FuzzTarget
{
    public override void Run(byte[] input)
    {
        Bounded.Run(async token =>
        {
            var (clientEnd, serverEnd) = InMemoryDuplex.CreatePair();
            await serverEnd.WriteAsync(input, token).ConfigureAwait(false);
            await serverEnd.DisposeAsync().ConfigureAwait(false);
            var drained = new ScriptedServer(serverEnd, ServerScript.None).DrainAsync(token);
            NbdClient client;
            try
            {
                client = await NbdClient.ConnectAsync(ClientHarness.Uri, ClientHarness.Options(clientEnd, listAndIdentify: true), token).ConfigureAwait(false);
            }
            catch (NbdException)
            {
                await Bounded.Within(drained, "the client's close after a failed handshake", token).ConfigureAwait(false);
                return;
            }
            catch (Exception exception) when (exception is not InvariantViolation)
            {
                throw new InvariantViolation($"connecting failed with {exception.GetType().Name}, not an NbdException: {exception.Message}", exception);
            }

            await using (client.ConfigureAwait(false))
            {
                var export = client.Export;
                // 4096 bytes at 0 when the export allows it: the first request of ClientScript, so recorded replies fit.
                var length = 4096 % export.MinimumBlockSize == 0 ? 4096 : (int)export.MinimumBlockSize;
                if (export.Size >= length && length <= export.MaximumPayload && length <= 1 << 16)
                {
                    var read = client.ReadAsync(0, new byte[length], token).AsTask();
                    await Bounded.Within(read.ContinueWith(static _ => { }, TaskScheduler.Default), "a READ", token).ConfigureAwait(false);
                    ClientScript.CheckOutcome(read, "a READ");
                }
            }

            await Bounded.Within(drained, "the client's close", token).ConfigureAwait(false);
        }, "a client handshake");
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        // What the scripted server really said to the real client, handshake and replies: recorded, not hand-made.
        foreach (var (name, bytes) in new ClientReplies().Seeds())
        {
            yield return ("recorded-" + name, ClientReplies.Exchange((ServerScript)bytes[0], bytes.AsMemory(1), listAndIdentify: true));
        }
    }
}
