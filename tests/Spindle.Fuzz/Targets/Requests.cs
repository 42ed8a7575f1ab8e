using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The transmission request header, compact (28 bytes) and extended (32 bytes, proto.md "Extended headers"), through
/// <see cref="NbdRequest.TryRead(ReadOnlySpan{byte}, bool, out NbdRequest)"/> both ways. Invariant: no exception; the
/// header alone parses alike; writing the parsed request gives the same bytes; the payload a request announces is
/// what the protocol says (WRITE only when compact, PAYLOAD_LEN when extended).
/// </summary>
[Covers(typeof(NbdRequest), nameof(NbdRequest.TryRead))]
public sealed class Requests : FuzzTarget
{
    public override void Run(byte[] input)
    {
        var compactDefault = NbdRequest.TryRead(input, out var viaDefault);
        var compact = NbdRequest.TryRead(input, extended: false, out var request);
        Check.That(compactDefault == compact && viaDefault == request, "TryRead without 'extended' differs from extended: false");
        Verify(input, extended: false);
        Verify(input, extended: true);
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        yield return ("read", Header(new NbdRequest(CommandFlags.None, NbdCommand.Read, 1, 4096, 512)));
        yield return ("write-fua", [.. Header(new NbdRequest(CommandFlags.Fua, NbdCommand.Write, 2, 0, 8)), .. new byte[8]]);
        yield return ("ext-block-status-payload",
            [.. Header(new NbdRequest(CommandFlags.PayloadLength, NbdCommand.BlockStatus, 3, 0, 12, extended: true)), .. new byte[12]]);
        yield return ("ext-trim-64bit", Header(new NbdRequest(CommandFlags.None, NbdCommand.Trim, 4, 0, 1UL << 40, extended: true)));
    }

    private static byte[] Header(NbdRequest request)
    {
        var bytes = new byte[request.HeaderLength];
        request.WriteTo(bytes);
        return bytes;
    }

    private static void Verify(byte[] input, bool extended)
    {
        var length = NbdRequest.HeaderLengthFor(extended);
        Check.PrefixStable(input, length, (ReadOnlySpan<byte> source, out NbdRequest value) => NbdRequest.TryRead(source, extended, out value), $"request (extended {extended})");
        if (NbdRequest.TryRead(input, extended, out var request) != ParseStatus.Done)
        {
            return;
        }

        Check.That(request.IsExtended == extended && request.HeaderLength == length, $"request header length {request.HeaderLength} (extended {extended})");
        var written = new byte[length];
        Check.That(request.WriteTo(written) == length, "request WriteTo length");
        Check.Same(input.AsSpan(0, length), written, $"request rewritten (extended {extended})");
        // WRITE always carries its payload (extended: with PAYLOAD_LEN or without, as qemu's client sends it); with
        // extended headers any other command carries one exactly when PAYLOAD_LEN is set.
        var hasPayload = request.Command == NbdCommand.Write || (extended && (request.Flags & CommandFlags.PayloadLength) != 0);
        Check.That(request.HasPayload == hasPayload, $"{request}: HasPayload {request.HasPayload}");
        Check.That(request.WirePayloadLength == (hasPayload ? request.LongLength : 0), $"{request}: wire payload {request.WirePayloadLength}");
        Check.That(request.PayloadLength >= 0 && (ulong)request.PayloadLength <= request.WirePayloadLength, $"{request}: payload length {request.PayloadLength}");
        Check.That(request.Length == Math.Min(request.LongLength, uint.MaxValue), $"{request}: 32-bit length {request.Length}");
        _ = request.ToString();
    }
}
