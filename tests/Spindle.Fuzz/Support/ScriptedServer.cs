using System.Buffers.Binary;
using Spindle.Protocol;

namespace Spindle.Fuzz.Support;

/// <summary>What the scripted server agrees to in the handshake: chosen by the first byte of a client target's input.</summary>
[Flags]
internal enum ServerScript : byte
{
    None = 0,

    /// <summary>ACK NBD_OPT_EXTENDED_HEADERS when the client asks (proto.md "Extended headers").</summary>
    ExtendedHeaders = 1 << 0,

    /// <summary>ACK NBD_OPT_STRUCTURED_REPLY (when extended headers were not agreed: then it is ERR_EXT_HEADER_REQD).</summary>
    StructuredReplies = 1 << 1,

    /// <summary>Advertise a 512-byte minimum block size.</summary>
    MinimumBlock512 = 1 << 2,
}

/// <summary>
/// A minimal, correct NBD server for the client targets: it negotiates by a fixed script (whatever the client asks,
/// in whatever order), reads the requests the target sends, and then says whatever bytes the fuzzer chose. It parses
/// only what it must to stay in step with the client; everything it sends is also recorded (for seeds).
/// </summary>
internal sealed class ScriptedServer(Stream stream, ServerScript script)
{
    public const ulong ExportSize = 1 << 20;
    public const uint BaseAllocationId = 1;

    public const TransmissionFlags Flags = TransmissionFlags.HasFlags | TransmissionFlags.SendFlush | TransmissionFlags.SendFua
        | TransmissionFlags.SendTrim | TransmissionFlags.SendWriteZeroes | TransmissionFlags.SendDf | TransmissionFlags.SendCache
        | TransmissionFlags.SendFastZero;

    private readonly MemoryStream _sent = new();

    public bool Extended { get; private set; }

    /// <summary>Every byte sent so far.</summary>
    public byte[] Sent => _sent.ToArray();

    /// <summary>The fixed newstyle handshake up to the end of GO (or EXPORT_NAME).</summary>
    public async Task NegotiateAsync(CancellationToken token)
    {
        var greeting = new byte[ServerGreeting.Length];
        ServerGreeting.Write(greeting, HandshakeFlags.FixedNewstyle | HandshakeFlags.NoZeroes);
        await SendAsync(greeting, token).ConfigureAwait(false);
        await ReceiveAsync(4, token).ConfigureAwait(false);
        var structured = false;
        while (true)
        {
            var header = await ReceiveAsync(OptionHeader.Length, token).ConfigureAwait(false);
            OptionHeader.TryRead(header, out var option);
            var data = await ReceiveAsync((int)Math.Min(option.DataLength, 1u << 16), token).ConfigureAwait(false);
            switch (option.Option)
            {
                case NbdOption.ExtendedHeaders when (script & ServerScript.ExtendedHeaders) != 0:
                    Extended = true;
                    await ReplyAsync(option.Option, OptionReplyType.Ack, [], token).ConfigureAwait(false);
                    break;
                case NbdOption.StructuredReply when Extended:
                    await ReplyAsync(option.Option, OptionReplyType.ErrorExtendedHeaderRequired, [], token).ConfigureAwait(false);
                    break;
                case NbdOption.StructuredReply when (script & ServerScript.StructuredReplies) != 0:
                    structured = true;
                    await ReplyAsync(option.Option, OptionReplyType.Ack, [], token).ConfigureAwait(false);
                    break;
                case NbdOption.SetMetaContext or NbdOption.ListMetaContext when (structured || Extended)
                    && MetaContextRequest.TryParse(data, out var meta, out _):
                    if (meta!.Queries.Count == 0 || meta.Queries.Contains(MetaContexts.BaseAllocation) || meta.Queries.Contains("base:"))
                    {
                        await ReplyAsync(option.Option, OptionReplyType.MetaContext, MetaContextReply.Create(BaseAllocationId, MetaContexts.BaseAllocation), token).ConfigureAwait(false);
                    }

                    await ReplyAsync(option.Option, OptionReplyType.Ack, [], token).ConfigureAwait(false);
                    break;
                case NbdOption.List:
                    await ReplyAsync(option.Option, OptionReplyType.Server, ServerReply.Create("disk", "scripted"), token).ConfigureAwait(false);
                    await ReplyAsync(option.Option, OptionReplyType.Ack, [], token).ConfigureAwait(false);
                    break;
                case NbdOption.Info or NbdOption.Go:
                    var export = new byte[InfoReplies.ExportLength];
                    InfoReplies.WriteExport(export, ExportSize, Flags);
                    await ReplyAsync(option.Option, OptionReplyType.Info, export, token).ConfigureAwait(false);
                    var sizes = new byte[InfoReplies.BlockSizeLength];
                    InfoReplies.WriteBlockSize(sizes, new BlockSizeConstraints((script & ServerScript.MinimumBlock512) != 0 ? 512u : 1u, 4096, 1 << 20));
                    await ReplyAsync(option.Option, OptionReplyType.Info, sizes, token).ConfigureAwait(false);
                    await ReplyAsync(option.Option, OptionReplyType.Info, InfoReplies.StringInfo(InfoType.Name, "disk"), token).ConfigureAwait(false);
                    await ReplyAsync(option.Option, OptionReplyType.Ack, [], token).ConfigureAwait(false);
                    if (option.Option == NbdOption.Go)
                    {
                        return;
                    }

                    break;
                case NbdOption.ExportName:
                    var reply = new byte[ExportNameReply.ShortLength];
                    ExportNameReply.Write(reply, ExportSize, Flags, noZeroes: true);
                    await SendAsync(reply, token).ConfigureAwait(false);
                    return;
                default:
                    await ReplyAsync(option.Option, OptionReplyType.ErrorUnsupported, [], token).ConfigureAwait(false);
                    break;
            }
        }
    }

    /// <summary>Reads <paramref name="count"/> requests (compact or extended, as negotiated), payloads skipped.</summary>
    public async Task<List<NbdRequest>> ReadRequestsAsync(int count, CancellationToken token)
    {
        var requests = new List<NbdRequest>();
        while (requests.Count < count)
        {
            var header = await ReceiveAsync(NbdRequest.HeaderLengthFor(Extended), token).ConfigureAwait(false);
            if (NbdRequest.TryRead(header, Extended, out var request) != ParseStatus.Done)
            {
                throw new InvariantViolation($"the client sent a request header {Convert.ToHexString(header)} (extended headers {Extended})");
            }

            await ReceiveAsync(request.PayloadLength, token).ConfigureAwait(false);
            requests.Add(request);
        }

        return requests;
    }

    public async Task SendAsync(ReadOnlyMemory<byte> bytes, CancellationToken token)
    {
        _sent.Write(bytes.Span);
        await stream.WriteAsync(bytes, token).ConfigureAwait(false);
    }

    /// <summary>Reads and drops what the client still sends (NBD_CMD_DISC) until it closes.</summary>
    public async Task DrainAsync(CancellationToken token)
    {
        var buffer = new byte[4096];
        while (await stream.ReadAsync(buffer, token).ConfigureAwait(false) > 0)
        {
        }
    }

    private async Task ReplyAsync(NbdOption option, OptionReplyType type, byte[] data, CancellationToken token)
    {
        var header = new byte[OptionReplyHeader.Length];
        OptionReplyHeader.Write(header, option, type, (uint)data.Length);
        await SendAsync(header, token).ConfigureAwait(false);
        await SendAsync(data, token).ConfigureAwait(false);
    }

    private async Task<byte[]> ReceiveAsync(int count, CancellationToken token)
    {
        var bytes = new byte[count];
        try
        {
            await stream.ReadExactlyAsync(bytes, token).ConfigureAwait(false);
        }
        catch (EndOfStreamException exception)
        {
            throw new InvariantViolation($"the client closed the connection where the scripted server waited for {count} bytes", exception);
        }

        return bytes;
    }
}

/// <summary>The requests the client targets send once connected, in this order (so cookies 1, 2, ... in this order).</summary>
internal static class ClientScript
{
    public static readonly byte[] WriteData = [.. Enumerable.Range(0, 512).Select(i => (byte)i)];

    /// <summary>
    /// READ 0+4096, READ 65536+1024, WRITE 8192+512, BLOCK_STATUS 0+1 MiB (only when base:allocation was agreed),
    /// TRIM 0+4096, WRITE_ZEROES 16384+4096. Each task ends in success or an exception.
    /// </summary>
    public static List<Task> Start(Client.NbdClient client, CancellationToken token)
    {
        var tasks = new List<Task>
        {
            client.ReadAsync(0, new byte[4096], token).AsTask(),
            client.ReadAsync(65536, new byte[1024], token).AsTask(),
            client.WriteAsync(8192, WriteData, token).AsTask(),
        };
        if (client.Export.CanBlockStatus)
        {
            tasks.Add(client.GetBlockStatusAsync(0, 1 << 20, cancellationToken: token));
        }

        tasks.Add(client.TrimAsync(0, 4096, cancellationToken: token).AsTask());
        tasks.Add(client.WriteZeroesAsync(16384, 4096, cancellationToken: token).AsTask());
        return tasks;
    }

    /// <summary>Every failure must be one the client documents for what a server does wrong: an NbdException.</summary>
    public static void CheckOutcome(Task task, string what)
    {
        if (task.Exception?.InnerException is { } exception and not Client.NbdException)
        {
            throw new InvariantViolation($"{what} failed with {exception.GetType().Name}, not an NbdException: {exception.Message}", exception);
        }
    }
}
