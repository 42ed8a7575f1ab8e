using System.CommandLine;
using System.Globalization;
using Spindle.Client;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle copy</c>: copy between NBD exports, files and block devices, sparse-aware and in parallel. Each end is
/// opened as a <see cref="BlockDevice"/> (<see cref="NbdBlockDevice"/>, <see cref="FileBlockDevice"/>,
/// <see cref="NullBlockDevice"/> for <c>null:</c>) and <see cref="CopyEngine"/> copies between them.
/// </summary>
internal static partial class CopyCommand
{
    private const string Examples = """
        Copy a disk between NBD exports, files and block devices, in either direction or NBD to NBD.

        Many requests are in flight at once (on several connections when the server advertises multi-conn).
        Holes the source reports (block status, SEEK_DATA) are not read, and blocks that read as zeroes are not
        written: the destination gets WRITE_ZEROES (or a punched hole), or nothing if it is a new file. The
        destination must be at least as large as the source; a destination file is created or resized to the
        source's size. The destination is flushed at the end.

        Examples:
          spindle copy nbd://server/disk disk.img             download an export to a sparse file
          spindle copy disk.img nbd://localhost/disk           upload a file
          spindle copy /dev/sdb nbd+unix:///?socket=/run/nbd.sock
          spindle copy nbd://a/disk nbd://b/disk               server to server
          spindle copy --json nbd://server/disk disk.img       a machine-readable summary
          spindle copy nbd://server/disk null:                read everything and discard it (a read benchmark)
          spindle copy null:1G nbd://server/disk               zero the first 1 GiB of an export
          spindle copy 'nbds://server/disk?tls-certificates=/etc/pki/nbd' disk.img   over TLS

        A lost connection (the server restarted, a network cut) does not fail the copy: requests wait while the
        client reconnects and are sent again, for up to --dead-timeout seconds.

        Incremental backup: with --bitmap NAME the source must be an NBD server offering the dirty bitmap NAME
        (qemu:dirty-bitmap:NAME: qemu-nbd -B NAME, or spindle serve of a qcow2 image with that persistent bitmap), and
        the destination the copy made last time, the same size. Only the ranges the bitmap marks dirty are copied.
          spindle copy --bitmap b1 nbd://server/disk backup.img
        """;

    public static Command Create()
    {
        var sourceArgument = new Argument<string>("source") { Description = "An NBD URI, a file or a block device to copy from, or null:SIZE for SIZE bytes of zeroes." };
        var destinationArgument = new Argument<string>("destination") { Description = "An NBD URI, a file or a block device to copy to, or null: to read the source and discard it (a read benchmark)." };
        var connections = new Option<int>("--connections", "-C")
        {
            Description = "Connections to each NBD end that advertises multi-conn.",
            DefaultValueFactory = _ => 4,
        };
        var requests = new Option<int?>("--requests", "-R")
        {
            Description = "Requests in flight per connection [default: 64 in all, spread over the connections].",
        };
        var requestSize = new Option<string?>("--request-size") { Description = "Bytes per request [default: 256K; at most what both ends accept]." };
        var sparse = new Option<string?>("--sparse", "-S") { Description = "Zero detection block size; 0 turns it off [default: 4096]." };
        var noExtents = new Option<bool>("--no-extents") { Description = "Do not ask the source for holes (block status, SEEK_DATA): read everything." };
        var allocated = new Option<bool>("--allocated") { Description = "Fully allocate the destination: zeroes are written (WRITE_ZEROES with NO_HOLE), never left as holes." };
        var destinationIsZero = new Option<bool>("--destination-is-zero") { Description = "Trust that the destination already reads as zeroes (zero ranges are then skipped)." };
        var progress = new Option<bool>("--progress", "-p") { Description = "Show a progress bar even when standard error is not a terminal." };
        var noProgress = new Option<bool>("--no-progress") { Description = "Never show a progress bar." };
        var json = new Option<bool>("--json") { Description = "Print the summary as JSON." };
        var quiet = new Option<bool>("--quiet", "-q") { Description = "Print no summary." };
        var bitmap = new Option<string?>("--bitmap", "-B")
        {
            Description = "Copy only the ranges the source's dirty bitmap NAME (qemu:dirty-bitmap:NAME) marks dirty, onto the existing copy DESTINATION of the same size.",
            HelpName = "NAME",
        };
        var deadTimeout = ClientCommandSupport.DeadTimeoutOption();
        var command = new Command("copy", Examples)
        {
            sourceArgument, destinationArgument, connections, requests, requestSize, sparse, noExtents, allocated,
            destinationIsZero, progress, noProgress, json, quiet, bitmap, deadTimeout,
        };

        command.SetAction((parse, cancellationToken) => ClientCommandSupport.RunAsync(async () =>
        {
            var settings = new CopySettings
            {
                Connections = parse.GetValue(connections),
                RequestsPerConnection = parse.GetValue(requests),
                UseExtents = !parse.GetValue(noExtents),
                Allocated = parse.GetValue(allocated),
                DestinationIsZero = parse.GetValue(destinationIsZero),
                DeadTimeout = ClientCommandSupport.ParseDeadTimeout(parse.GetValue(deadTimeout)),
            };
            if (settings.Connections is < 1 or > 64)
            {
                throw new FormatException($"--connections {settings.Connections}: give 1 to 64");
            }

            if (settings.RequestsPerConnection is < 1 or > 1024)
            {
                throw new FormatException($"--requests {settings.RequestsPerConnection}: give 1 to 1024");
            }

            if (parse.GetValue(requestSize) is { } sizeText)
            {
                var size = ClientCommandSupport.ParseSize(sizeText, "--request-size");
                if (size is < 512 or > 32 * 1024 * 1024)
                {
                    throw new FormatException($"--request-size {sizeText}: give 512 bytes to 32M");
                }

                settings.RequestSize = (int)size;
            }

            if (parse.GetValue(sparse) is { } sparseText)
            {
                var size = ClientCommandSupport.ParseSize(sparseText, "--sparse");
                if (size != 0 && (size < 512 || size > settings.RequestSize || !long.IsPow2(size)))
                {
                    throw new FormatException($"--sparse {sparseText}: give 0 or a power of two from 512 to the request size");
                }

                settings.SparseSize = (int)size;
            }

            var sourceName = parse.GetValue(sourceArgument)!;
            var destinationName = parse.GetValue(destinationArgument)!;
            var showProgress = !parse.GetValue(noProgress) && (parse.GetValue(progress) || !Console.IsErrorRedirected);
            CopyResult result;
            EndpointSummary source, destination;
            DirtySummary? dirty = null;
            if (parse.GetValue(bitmap) is { } bitmapName)
            {
                (result, source, destination, dirty) = await CopyBitmapAsync(sourceName, destinationName, bitmapName, settings, showProgress, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                (result, source, destination) = await CopyAsync(sourceName, destinationName, settings, showProgress, cancellationToken).ConfigureAwait(false);
            }

            if (parse.GetValue(json))
            {
                WriteJson(Console.Out, sourceName, destinationName, source, destination, result, dirty);
            }
            else if (!parse.GetValue(quiet))
            {
                WriteText(Console.Out, sourceName, destinationName, result, dirty);
            }

            return 0;
        }, cancellationToken));
        return command;
    }

    /// <summary>Opens both ends, runs the copy and closes them (flushed).</summary>
    internal static async Task<(CopyResult Result, EndpointSummary Source, EndpointSummary Destination)> CopyAsync(
        string sourceName, string destinationName, CopySettings settings, bool showProgress, CancellationToken cancellationToken)
    {
        if (!NbdUri.LooksLikeUri(sourceName) && !NbdUri.LooksLikeUri(destinationName) &&
            Path.GetFullPath(sourceName) == Path.GetFullPath(destinationName))
        {
            throw new FormatException($"source and destination are the same file '{sourceName}'");
        }

        var source = await OpenSourceAsync(sourceName, settings, cancellationToken).ConfigureAwait(false);
        await using (source.ConfigureAwait(false))
        {
            var (destination, emptied) = await OpenDestinationAsync(destinationName, source.Size, settings, cancellationToken).ConfigureAwait(false);
            await using (destination.ConfigureAwait(false))
            {
                if (destination.Size < source.Size)
                {
                    throw new IOException($"the destination {destinationName} ({destination.Size} bytes) is smaller than the source {sourceName} ({source.Size} bytes)");
                }

                if (destination.Size > source.Size)
                {
                    await Console.Error.WriteLineAsync(
                        $"spindle: warning: the destination is {destination.Size - source.Size} bytes larger than the source; those last bytes are left as they were").ConfigureAwait(false);
                }

                // A file this copy has just created or emptied reads as zeroes: its holes need not be written at all.
                var engine = new CopyEngine(source, destination, emptied ? settings with { DestinationIsZero = true } : settings);
                using var bar = showProgress ? new ProgressBar(source.Size, () => engine.DoneBytes) : null;
                var result = await engine.RunAsync(cancellationToken).ConfigureAwait(false);
                bar?.Complete();
                return (result, Summarize(source), Summarize(destination));
            }
        }
    }

    private static void WriteText(TextWriter output, string source, string destination, CopyResult result, DirtySummary? dirty)
    {
        var seconds = result.Elapsed.TotalSeconds;
        if (dirty is not null)
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{dirty.Context}: {dirty.DirtyBytes} bytes ({ClientCommandSupport.Human(dirty.DirtyBytes)}) dirty in {dirty.DirtyRanges} ranges"));
        }

        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"copied {result.Size} bytes ({ClientCommandSupport.Human(result.Size)}) from {source} to {destination} in {seconds:0.000} s, {ClientCommandSupport.Human((long)result.BytesPerSecond)}/s"));
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  {ClientCommandSupport.Human(result.DataBytes)} written as data, {ClientCommandSupport.Human(result.ZeroedBytes)} zeroed, {ClientCommandSupport.Human(result.SkippedBytes)} skipped (destination already zero)"));
    }

    private static void WriteJson(TextWriter output, string source, string destination, EndpointSummary sourceSummary, EndpointSummary destinationSummary, CopyResult result,
        DirtySummary? dirty)
    {
        InfoCommand.WriteJson(output, writer =>
        {
            writer.WriteStartObject();
            writer.WriteString("source", source);
            writer.WriteString("destination", destination);
            writer.WriteNumber("bytes", result.Size);
            writer.WriteNumber("seconds", Math.Round(result.Elapsed.TotalSeconds, 6));
            writer.WriteNumber("bytes_per_second", Math.Round(result.BytesPerSecond));
            writer.WriteNumber("data_bytes", result.DataBytes);
            writer.WriteNumber("zeroed_bytes", result.ZeroedBytes);
            writer.WriteNumber("skipped_bytes", result.SkippedBytes);
            writer.WriteNumber("request_size", result.RequestSize);
            writer.WriteNumber("requests_in_flight", result.Workers);
            if (dirty is not null)
            {
                // "bytes" above is what was copied: the dirty ranges rounded out to the block size both ends accept.
                writer.WriteString("bitmap", dirty.Context);
                writer.WriteNumber("dirty_bytes", dirty.DirtyBytes);
                writer.WriteNumber("dirty_ranges", dirty.DirtyRanges);
            }

            foreach (var (name, summary) in new[] { ("source_info", sourceSummary), ("destination_info", destinationSummary) })
            {
                writer.WriteStartObject(name);
                writer.WriteString("kind", summary.Kind);
                writer.WriteNumber("size", summary.Size);
                if (summary.Connections is { } count)
                {
                    writer.WriteNumber("connections", count);
                }

                writer.WriteBoolean("extents", summary.Extents);
                writer.WriteEndObject();
            }

            writer.WriteEndObject();
        });
    }

    /// <summary>A one-line progress bar on standard error, redrawn a few times a second.</summary>
    private sealed class ProgressBar : IDisposable
    {
        private readonly long _total;
        private readonly Func<long> _done;
        private readonly Timer _timer;
        private readonly DateTime _started = DateTime.UtcNow;
        private readonly Lock _lock = new();
        private bool _finished;

        public ProgressBar(long total, Func<long> done)
        {
            _total = total;
            _done = done;
            _timer = new Timer(_ => Draw(false), null, TimeSpan.Zero, TimeSpan.FromMilliseconds(250));
        }

        public void Complete() => Draw(true);

        public void Dispose()
        {
            _timer.Dispose();
            lock (_lock)
            {
                if (!_finished)
                {
                    _finished = true;
                    Console.Error.WriteLine();
                }
            }
        }

        private void Draw(bool final)
        {
            lock (_lock)
            {
                if (_finished)
                {
                    return;
                }

                var done = final ? _total : Math.Min(_done(), _total);
                var fraction = _total == 0 ? 1.0 : (double)done / _total;
                const int Width = 40;
                var filled = (int)(fraction * Width);
                var seconds = Math.Max((DateTime.UtcNow - _started).TotalSeconds, 0.001);
                var rate = done / seconds;
                var bar = new string('#', filled) + new string('.', Width - filled);
                Console.Error.Write(string.Create(CultureInfo.InvariantCulture,
                    $"\r[{bar}] {fraction * 100,5:0.0}%  {ClientCommandSupport.Human(done)} of {ClientCommandSupport.Human(_total)}  {ClientCommandSupport.Human((long)rate)}/s   "));
                if (final)
                {
                    Console.Error.WriteLine();
                    _finished = true;
                }
            }
        }
    }
}
