using System.CommandLine;
using System.Text;
using Spindle.Client;

namespace Spindle.Cli.Commands;

/// <summary><c>spindle dump</c>: a hex dump of a range of an export, in <c>hexdump -C</c>'s format.</summary>
internal static class DumpCommand
{
    private const string Examples = """
        Print a range of an NBD export as a hex dump, in the format of hexdump -C (offsets are absolute;
        a run of identical lines is shown once, then "*").

        Examples:
          spindle dump nbd://localhost/disk                       the whole export
          spindle dump -o 1M -n 512 nbd://localhost/disk          512 bytes from offset 1 MiB
          spindle dump -v -n 4K nbd+unix:///?socket=/run/nbd.sock  every line, no "*"
        """;

    /// <summary>Bytes per READ; several are kept in flight so the dump streams.</summary>
    private const int ChunkSize = 1024 * 1024;

    private const int ReadsInFlight = 4;

    public static Command Create()
    {
        var uri = new Argument<string>("uri") { Description = "The NBD URI of the export." };
        var offset = new Option<string?>("--offset", "-o") { Description = "Where to start (bytes; K, M, G suffixes) [default: 0]." };
        var length = new Option<string?>("--length", "-n") { Description = "How many bytes to dump [default: to the end of the export]." };
        var all = new Option<bool>("--all", "-v") { Description = "Print every line: do not collapse repeated lines into \"*\"." };
        var deadTimeout = ClientCommandSupport.DeadTimeoutOption();
        var command = new Command("dump", Examples) { uri, offset, length, all, deadTimeout };
        command.SetAction((parse, cancellationToken) => ClientCommandSupport.RunAsync(async () =>
        {
            var target = NbdUri.Parse(parse.GetValue(uri)!);
            var start = parse.GetValue(offset) is { } offsetText ? ClientCommandSupport.ParseSize(offsetText, "--offset") : 0;
            long? count = parse.GetValue(length) is { } lengthText ? ClientCommandSupport.ParseSize(lengthText, "--length") : null;
            var options = ClientCommandSupport.Options(deadTimeout: ClientCommandSupport.ParseDeadTimeout(parse.GetValue(deadTimeout)));
            options.MetaContexts.Clear();
            var client = await NbdClient.ConnectAsync(target, options, cancellationToken).ConfigureAwait(false);
            await using (client.ConfigureAwait(false))
            {
                if (start > client.Size)
                {
                    throw new ArgumentOutOfRangeException(nameof(offset), $"--offset {start} is beyond the end of the export ({client.Size} bytes)");
                }

                var end = count is { } n ? start + n : client.Size;
                if (end > client.Size)
                {
                    throw new ArgumentOutOfRangeException(nameof(length), $"--offset {start} --length {count} reaches past the end of the export ({client.Size} bytes)");
                }

                var stdout = Console.OpenStandardOutput();
                await using (stdout.ConfigureAwait(false))
                {
                    var writer = new StreamWriter(stdout, new UTF8Encoding(false), 1 << 16) { NewLine = "\n" };
                    await using (writer.ConfigureAwait(false))
                    {
                        await DumpAsync(client, start, end, !parse.GetValue(all), writer, cancellationToken).ConfigureAwait(false);
                    }
                }
            }

            return 0;
        }, cancellationToken));
        return command;
    }

    /// <summary>Streams [<paramref name="start"/>, <paramref name="end"/>) as hexdump -C lines.</summary>
    internal static async Task DumpAsync(NbdClient client, long start, long end, bool squeeze, TextWriter writer, CancellationToken cancellationToken)
    {
        // READs must respect the export's minimum block size: read aligned chunks and format the part asked for.
        var alignment = (long)client.Export.MinimumBlockSize;
        var chunk = Math.Max(alignment, Math.Min(ChunkSize, client.Export.MaximumPayload) / alignment * alignment);
        var alignedStart = start / alignment * alignment;
        var formatter = new HexFormatter(writer, start, squeeze);
        var pending = new Queue<(long Offset, byte[] Buffer, int Length, Task Read)>();
        var next = alignedStart;
        try
        {
            while (next < end || pending.Count > 0)
            {
                while (next < end && pending.Count < ReadsInFlight)
                {
                    var length = (int)Math.Min(chunk, RoundUp(end, alignment, client.Size) - next);
                    var buffer = new byte[length];
                    pending.Enqueue((next, buffer, length, client.ReadAsync(next, buffer, cancellationToken).AsTask()));
                    next += length;
                }

                var (offset, data, count, read) = pending.Dequeue();
                await read.ConfigureAwait(false);
                var from = (int)Math.Max(0, start - offset);
                var to = (int)Math.Min(count, end - offset);
                if (to > from)
                {
                    formatter.Write(data.AsSpan(from, to - from));
                }
            }
        }
        finally
        {
            // Never leave reads running into buffers nobody waits for.
            while (pending.Count > 0)
            {
                try
                {
                    await pending.Dequeue().Read.ConfigureAwait(false);
                }
                catch (Exception exception) when (exception is IOException or OperationCanceledException)
                {
                }
            }
        }

        formatter.Finish();
    }

    private static long RoundUp(long value, long alignment, long limit) => Math.Min(limit, (value + alignment - 1) / alignment * alignment);

    /// <summary>hexdump -C: "%08x  " then 16 bytes "xx " with an extra space after the 8th, " |", the printable text, "|".</summary>
    private sealed class HexFormatter(TextWriter writer, long start, bool squeeze)
    {
        private readonly byte[] _line = new byte[16];
        private readonly byte[] _previous = new byte[16];
        private readonly char[] _text = new char[96];
        private int _filled;
        private long _lineOffset = start;
        private bool _havePrevious;
        private bool _squeezing;

        public void Write(ReadOnlySpan<byte> data)
        {
            while (!data.IsEmpty)
            {
                var take = Math.Min(16 - _filled, data.Length);
                data[..take].CopyTo(_line.AsSpan(_filled));
                _filled += take;
                data = data[take..];
                if (_filled == 16)
                {
                    EmitLine(16);
                }
            }
        }

        public void Finish()
        {
            if (_filled > 0)
            {
                EmitLine(_filled);
            }

            writer.Write(_lineOffset.ToString("x8", System.Globalization.CultureInfo.InvariantCulture));
            writer.WriteLine();
        }

        private void EmitLine(int count)
        {
            if (squeeze && count == 16 && _havePrevious && _line.AsSpan().SequenceEqual(_previous))
            {
                if (!_squeezing)
                {
                    writer.WriteLine("*");
                    _squeezing = true;
                }
            }
            else
            {
                _squeezing = false;
                Format(count);
            }

            _line.AsSpan(0, count).CopyTo(_previous);
            _havePrevious = count == 16;
            _lineOffset += count;
            _filled = 0;
        }

        private void Format(int count)
        {
            const string Hex = "0123456789abcdef";
            var text = _text.AsSpan();
            text[..61].Fill(' ');
            var position = 10;
            for (var i = 0; i < 16; i++)
            {
                if (i < count)
                {
                    text[position] = Hex[_line[i] >> 4];
                    text[position + 1] = Hex[_line[i] & 0xf];
                }

                position += i == 7 ? 4 : 3;
            }

            text[60] = '|';
            for (var i = 0; i < count; i++)
            {
                var b = _line[i];
                text[61 + i] = b is >= 0x20 and < 0x7f ? (char)b : '.';
            }

            text[61 + count] = '|';
            writer.Write(_lineOffset.ToString("x8", System.Globalization.CultureInfo.InvariantCulture));
            writer.Write(text.Slice(8, 62 + count - 8));
            writer.WriteLine();
        }
    }
}
