using Spindle.Cli.Hosting;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Storage.Layers;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle copy --bitmap NAME IMAGE DST</c> with a local image as the source, no server in between: the bitmap is
/// the one <c>spindle serve --bitmap NAME</c> kept for the image (docs/bitmaps.md), or the image's own persistent
/// qcow2 bitmap of that name. Both are read through the device's <c>qemu:dirty-bitmap:NAME</c> context, as a server
/// would offer it. A bitmap that a running server holds is refused (its lock is taken here as a server takes it):
/// the image is changing under that server, so the copy must come from the server's URI.
/// </summary>
internal static partial class CopyCommand
{
    /// <summary>The most extents asked for at once when reading a bitmap locally.</summary>
    private const int LocalBitmapExtents = 4096;

    /// <summary>Opens the image read-only with the bitmap named by <paramref name="context"/>; the bitmap's context comes with it.</summary>
    private static async Task<(BlockDevice Device, MetaContextSource Bitmap)> OpenLocalBitmapSourceAsync(string path, string context, CancellationToken cancellationToken)
    {
        cancellationToken.ThrowIfCancellationRequested();
        var name = context[MetaContexts.DirtyBitmapPrefix.Length..];
        if (!File.Exists(path) && !(path.StartsWith("/dev/", StringComparison.Ordinal) && Path.Exists(path)))
        {
            throw new FileNotFoundException($"source '{path}' does not exist");
        }

        var device = ImageBackend.Open(path, ImageFormat.Auto, readOnly: true);
        try
        {
            // A qcow2 image's own persistent bitmap.
            if (device.MetaContexts.FirstOrDefault(c => c.Name == context) is { } own)
            {
                return (device, own);
            }

            var location = BitmapLocation.For(path, device is FileBlockDevice { IsBlockDevice: true }, stateDirectory: null);
            if (!File.Exists(location.PathOf(name)))
            {
                // Both kinds it has: a qcow2 image's own bitmaps and the ones Spindle keeps for it.
                var known = device.MetaContexts.Select(c => c.Name).Where(n => n.StartsWith(MetaContexts.DirtyBitmapPrefix, StringComparison.Ordinal))
                    .Select(n => n[MetaContexts.DirtyBitmapPrefix.Length..])
                    .Concat(Directory.Exists(location.Directory) ? location.Names() : []).Distinct().ToList();
                throw new FileNotFoundException(
                    $"{path} has no bitmap '{name}' ({(known.Count == 0 ? "it has none" : "it has " + string.Join(", ", known))}; spindle bitmap list {path})");
            }

            var definition = new ExportDefinition { Options = new ExportOptions { ReadOnly = true }, Location = path, Source = path };
            definition.Layers.Bitmaps.Add(name);
            try
            {
                device = BitmapLayer.Open(definition, device);
            }
            catch (ConfigurationException exception) when (exception.InnerException is BitmapInUseException)
            {
                // A failure of the source, not of the command line: exit 1, as for any source that cannot be read.
                throw new IOException($"{exception.Message}: the image is being served, so copy from the server's nbd:// URI instead", exception);
            }
            catch (ConfigurationException exception)
            {
                throw new IOException(exception.Message, exception);
            }

            return (device, device.MetaContexts.First(c => c.Name == context));
        }
        catch
        {
            await device.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>
    /// The dirty ranges of a device's bitmap context over the whole device, asked in pieces of at most
    /// <see cref="LocalBitmapExtents"/> extents (bounded: every answer must describe at least one byte).
    /// </summary>
    internal static async Task<(IReadOnlyList<ByteRange> Ranges, long DirtyBytes)> ReadDirtyRangesAsync(MetaContextSource bitmap, long size, CancellationToken cancellationToken)
    {
        var ranges = new DirtyRangeSet();
        var extents = new ExtentList(LocalBitmapExtents);
        var offset = 0L;
        while (offset < size)
        {
            extents.Clear(LocalBitmapExtents);
            await bitmap.GetStatusAsync(offset, size - offset, extents, cancellationToken).ConfigureAwait(false);
            if (extents.TotalLength <= 0)
            {
                throw new InvalidDataException($"the bitmap {bitmap.Name} described nothing at offset {offset}");
            }

            foreach (var extent in extents.Items)
            {
                var length = Math.Min(extent.Length, size - offset);
                if ((extent.Status & 1) != 0)
                {
                    ranges.Add(offset, length);
                }

                offset += length;
                if (offset >= size)
                {
                    break;
                }
            }
        }

        return (ranges.Ranges, ranges.DirtyBytes);
    }
}
