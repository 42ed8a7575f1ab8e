using Microsoft.Extensions.Logging;
using Spindle.Fuzz.Support;
using Spindle.Protocol;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Wire;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// A real <see cref="NbdServer"/> with memory exports, fed the input as everything a client sends, over an in-memory
/// transport: the option parsing of negotiation and the request parsing of transmission. The client side closes
/// after the input. Invariant: the server ends the connection within <see cref="Bounded.Limit"/>, never logs an
/// error (an unexpected exception is logged as "connection failed"), and everything it sent is what the protocol
/// allows in answer to those bytes (<see cref="ServerTranscript"/>).
/// </summary>
[Covers("Spindle.Server", "Spindle.Server.Negotiation.ServerNegotiator", "HandleOptionAsync")]
[Covers("Spindle.Server", "Spindle.Server.Connections.NbdConnection", "ReadRequestsAsync")]
public sealed class ServerSession : FuzzTarget
{
    public override void Run(byte[] input)
    {
        var logs = new CapturingLogs();
        byte[] output = [];
        Bounded.Run(async token =>
        {
            await using var catalog = Catalog();
            var server = new NbdServer(new ServerOptions { ShutdownTimeout = TimeSpan.FromSeconds(2) }, catalog, logs);
            await using (server.ConfigureAwait(false))
            {
                var (client, serverEnd) = InMemoryDuplex.CreatePair();
                var connection = server.ServeAsync(new StreamTransport(serverEnd, "fuzz-client"));
                await client.WriteAsync(input, token).ConfigureAwait(false);

                // Disposing the client's end closes its sending direction only: the server sees the end of the stream,
                // and whatever it still sends stays readable.
                await client.DisposeAsync().ConfigureAwait(false);
                output = await Bounded.ReadToEndAsync(client, "the server's connection", token).ConfigureAwait(false);
                await Bounded.Within(connection, "the server's connection task", token).ConfigureAwait(false);
            }
        }, "a server connection");

        if (logs.AtLeast(LogLevel.Error).FirstOrDefault() is { } error)
        {
            throw new InvariantViolation($"the server logged an error: {error}");
        }

        ServerTranscript.Check(input, output);
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var go = new InfoRequest("mem", [InfoType.BlockSize, InfoType.Name, InfoType.Description]).ToBytes();
        var meta = new MetaContextRequest("mem", [MetaContexts.BaseAllocation, StableNames.MetaNamespace]).ToBytes();
        yield return ("go-read-write-status", new WireBuilder().ClientFlags()
            .Option(NbdOption.StructuredReply).Option(NbdOption.SetMetaContext, meta).Option(NbdOption.Go, go)
            .Request(NbdCommand.Read, 1, 0, 4096).Request(NbdCommand.Write, 2, 4096, 16).Zeroes(16)
            .Request(NbdCommand.BlockStatus, 3, 0, 65536).Request(NbdCommand.Trim, 4, 0, 4096).Request(NbdCommand.WriteZeroes, 5, 8192, 4096)
            .Request(NbdCommand.Flush, 6, 0, 0).Request(NbdCommand.Cache, 7, 0, 4096).Request(NbdCommand.Disconnect, 8, 0, 0).ToArray());
        yield return ("simple-export-name", new WireBuilder().ClientFlags(ClientFlags.FixedNewstyle)
            .Option(NbdOption.ExportName, "mem"u8).Request(NbdCommand.Read, 1, 512, 512).Request(NbdCommand.Write, 2, 0, 4).Zeroes(4)
            .Request(NbdCommand.Read, 3, 1 << 30, 512).Request(NbdCommand.Disconnect, 4, 0, 0).ToArray());
        yield return ("list-info-abort", new WireBuilder().ClientFlags()
            .Option(NbdOption.List).Option(NbdOption.Info, new InfoRequest("ro", [InfoType.BlockSize]).ToBytes())
            .Option(NbdOption.ListMetaContext, new MetaContextRequest("mem", []).ToBytes()).Option(NbdOption.StartTls)
            .Option((NbdOption)42, "junk"u8).Option(NbdOption.Abort).ToArray());
        yield return ("extended-headers", new WireBuilder().ClientFlags()
            .Option(NbdOption.ExtendedHeaders).Option(NbdOption.StructuredReply).Option(NbdOption.SetMetaContext, meta).Option(NbdOption.Go, go)
            .ExtendedRequest(NbdCommand.Read, 1, 0, 4096).ExtendedRequest(NbdCommand.Write, 2, 0, 8, CommandFlags.PayloadLength).Zeroes(8)
            .ExtendedRequest(NbdCommand.BlockStatus, 3, 0, 1 << 20).ExtendedRequest(NbdCommand.Trim, 4, 0, 1UL << 33)
            .ExtendedRequest(NbdCommand.Disconnect, 5, 0, 0).ToArray());
        yield return ("block-sizes", new WireBuilder().ClientFlags()
            .Option(NbdOption.Go, new InfoRequest("blk", [InfoType.BlockSize]).ToBytes())
            .Request(NbdCommand.Read, 1, 100, 7).Request(NbdCommand.Write, 2, 512, 512).Zeroes(512).ToArray());
    }

    /// <summary>"mem" (the default, with stable names), "ro" (read-only) and "blk" (512-byte minimum blocks).</summary>
    private static ExportCatalog Catalog()
    {
        var catalog = new ExportCatalog { DefaultExportName = "mem" };
        catalog.Add(new Export(new ExportOptions
        {
            Name = "mem",
            Description = "fuzz disk",
            Uuid = new Guid("0f5e1c52-8a4b-4c3e-9d7a-2b6c1e0f9a11"),
            Label = "fuzz",
            Serial = "F1",
        }, new MemoryBlockDevice(256 * 1024)));
        catalog.Add(new Export(new ExportOptions { Name = "ro", ReadOnly = true }, new MemoryBlockDevice(64 * 1024)));
        catalog.Add(new Export(new ExportOptions { Name = "blk", BlockSizes = new BlockSizeConstraints(512, 4096, 65536) }, new MemoryBlockDevice(64 * 1024)));
        return catalog;
    }
}
