using System.Globalization;
using Spindle.Cli.Hosting;
using Spindle.Client;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle copy --bitmap NAME SRC DST</c>: an incremental backup. The source server offers the dirty bitmap NAME as
/// the metadata context <c>qemu:dirty-bitmap:NAME</c> (qemu-nbd -B NAME, or <c>spindle serve --bitmap NAME</c>), or
/// the source is a local image with that bitmap (CopyCommand.LocalBitmap.cs); the destination is the copy made last time, the same size. Only the ranges the bitmap marks
/// dirty are copied; inside them <c>base:allocation</c> still says which bytes are zeroes, so those become
/// WRITE_ZEROES (or punched holes) on the destination instead of reads.
/// </summary>
internal static partial class CopyCommand
{
    /// <summary>What a bitmap copy adds to the summary: how much the bitmap said was dirty.</summary>
    internal sealed record DirtySummary(string Context, long DirtyBytes, int DirtyRanges);

    /// <summary>Opens both ends, reads the bitmap, copies the dirty ranges and closes both ends (flushed).</summary>
    internal static async Task<(CopyResult Result, EndpointSummary Source, EndpointSummary Destination, DirtySummary Dirty)> CopyBitmapAsync(
        string sourceName, string destinationName, string bitmap, CopySettings settings, bool showProgress, CancellationToken cancellationToken)
    {
        var context = BitmapContext(bitmap);
        if (settings.DestinationIsZero)
        {
            throw new FormatException("--destination-is-zero cannot go with --bitmap: the destination is the copy made last time, not zeroes");
        }

        if (destinationName.StartsWith(NullName, StringComparison.Ordinal))
        {
            throw new FormatException($"spindle copy --bitmap writes into the copy made last time: {NullName} cannot be the destination");
        }

        BlockDevice source;
        Func<Task<(IReadOnlyList<ByteRange> Ranges, long DirtyBytes)>> readRanges;
        if (NbdUri.LooksLikeUri(sourceName))
        {
            var client = await ConnectBitmapSourceAsync(sourceName, context, settings, cancellationToken).ConfigureAwait(false);
            source = new NbdBlockDevice(client, readOnly: true);
            readRanges = () => ReadDirtyRangesAsync(client, context, client.Export.Size, cancellationToken);
        }
        else
        {
            var (device, bitmapContext) = await OpenLocalBitmapSourceAsync(sourceName, context, cancellationToken).ConfigureAwait(false);
            source = device;
            readRanges = () => ReadDirtyRangesAsync(bitmapContext, device.Size, cancellationToken);
        }

        await using (source.ConfigureAwait(false))
        {
            var destination = await OpenExistingDestinationAsync(destinationName, source.Size, settings, cancellationToken).ConfigureAwait(false);
            await using (destination.ConfigureAwait(false))
            {
                var (ranges, dirtyBytes) = await readRanges().ConfigureAwait(false);
                var engine = new CopyEngine(source, destination, settings with { DestinationIsZero = false, Ranges = ranges });
                using var bar = showProgress ? new ProgressBar(engine.TotalBytes, () => engine.DoneBytes) : null;
                var result = await engine.RunAsync(cancellationToken).ConfigureAwait(false);
                bar?.Complete();
                return (result, Summarize(source), Summarize(destination), new DirtySummary(context, dirtyBytes, ranges.Count));
            }
        }
    }

    /// <summary>NAME, or the whole context name, to <c>qemu:dirty-bitmap:NAME</c>.</summary>
    internal static string BitmapContext(string bitmap)
    {
        var name = bitmap.StartsWith(MetaContexts.DirtyBitmapPrefix, StringComparison.Ordinal) ? bitmap[MetaContexts.DirtyBitmapPrefix.Length..] : bitmap;
        if (name.Length == 0)
        {
            throw new FormatException("--bitmap needs the bitmap's name");
        }

        var context = MetaContexts.DirtyBitmapPrefix + name;
        try
        {
            NbdString.Validate(context, "--bitmap");
        }
        catch (ArgumentException exception)
        {
            throw new FormatException($"--bitmap {bitmap}: {ClientCommandSupport.Clean(exception)}", exception);
        }

        return context;
    }

    /// <summary>
    /// Connects asking for <c>base:allocation</c> (unless <c>--no-extents</c>) and the bitmap's context; a server that
    /// does not agree to the bitmap's context is refused, naming the contexts it does offer.
    /// </summary>
    private static async Task<NbdClient> ConnectBitmapSourceAsync(string name, string context, CopySettings settings, CancellationToken cancellationToken)
    {
        var uri = NbdUri.Parse(name);
        var options = ClientOptions(settings);
        options.MetaContexts.Clear();
        if (settings.UseExtents)
        {
            options.MetaContexts.Add(MetaContexts.BaseAllocation);
        }

        options.MetaContexts.Add(context);
        var client = await NbdClient.ConnectAsync(uri, options, cancellationToken).ConfigureAwait(false);
        if (client.Export.MetaContexts.ContainsKey(context))
        {
            return client;
        }

        var structured = client.Export.StructuredReplies;
        await client.DisposeAsync().ConfigureAwait(false);
        if (!structured)
        {
            throw new NotSupportedException($"{name} does not offer {context}: the server does not do structured replies, so it has no metadata contexts");
        }

        var offered = await OfferedContextsAsync(uri, cancellationToken).ConfigureAwait(false);
        throw new NotSupportedException($"{name} does not offer {context}; it offers {offered}");
    }

    /// <summary>The contexts the export lists (NBD_OPT_LIST_META_CONTEXT), for the refusal's message.</summary>
    private static async Task<string> OfferedContextsAsync(NbdUri uri, CancellationToken cancellationToken)
    {
        try
        {
            var options = ClientCommandSupport.Options(1);
            options.MetaContexts.Clear();
            options.ListMetaContexts = true;
            var lister = await NbdClient.ConnectAsync(uri, options, cancellationToken).ConfigureAwait(false);
            await using (lister.ConfigureAwait(false))
            {
                return lister.Export.AvailableMetaContexts is { Count: > 0 } available ? string.Join(", ", available) : "no metadata contexts";
            }
        }
        catch (Exception exception) when (exception is IOException or NotSupportedException or TimeoutException)
        {
            return $"contexts it would not list ({exception.Message})";
        }
    }

    /// <summary>
    /// The destination of an incremental copy must already exist (it holds the last backup) and be exactly the
    /// source's size: a larger or smaller one is not a copy of this disk. It is never created, emptied or resized.
    /// </summary>
    private static async Task<BlockDevice> OpenExistingDestinationAsync(string name, long size, CopySettings settings, CancellationToken cancellationToken)
    {
        BlockDevice device;
        if (NbdUri.LooksLikeUri(name))
        {
            (device, _) = await OpenDestinationAsync(name, size, settings, cancellationToken).ConfigureAwait(false);
        }
        else if (!File.Exists(name) && !(name.StartsWith("/dev/", StringComparison.Ordinal) && Path.Exists(name)))
        {
            throw new FileNotFoundException(
                $"the destination '{name}' does not exist: spindle copy --bitmap updates the copy made last time (make it first with a full spindle copy)");
        }
        else
        {
            device = IsQcow2(name) ? ImageBackend.Open(name, ImageFormat.Qcow2, readOnly: false) : FileBlockDevice.Open(name, readOnly: false);
        }

        if (device.Size != size)
        {
            var destinationSize = device.Size;
            await device.DisposeAsync().ConfigureAwait(false);
            throw new IOException(string.Create(CultureInfo.InvariantCulture,
                $"the destination {name} is {destinationSize} bytes but the source is {size}: an incremental copy needs the copy made last time, the same size"));
        }

        return device;
    }

    /// <summary>
    /// The dirty ranges of <paramref name="context"/> over the whole export (<see cref="DirtyRangeSet"/>: in order,
    /// merged, bounded in number) and the dirty total. qemu's extents follow the bitmap's granularity, which need not
    /// match anything the client asked: the client asks again from where each answer ended until the export is
    /// covered (bounded: every answer describes at least one byte) and clips the last extent to the export.
    /// </summary>
    internal static async Task<(IReadOnlyList<ByteRange> Ranges, long DirtyBytes)> ReadDirtyRangesAsync(NbdClient client, string context, long size, CancellationToken cancellationToken)
    {
        var ranges = new DirtyRangeSet();
        await foreach (var extent in client.GetExtentsAsync(0, size, context, cancellationToken).ConfigureAwait(false))
        {
            // qemu:dirty-bitmap:NAME: bit 0 set means dirty; the other bits are reserved.
            if ((extent.Flags & 1) != 0)
            {
                ranges.Add(extent.Offset, extent.Length);
            }
        }

        return (ranges.Ranges, ranges.DirtyBytes);
    }
}
