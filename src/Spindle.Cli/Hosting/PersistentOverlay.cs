using Spindle.Storage;
using Spindle.Storage.Qcow2;

namespace Spindle.Cli.Hosting;

/// <summary>
/// The persistent overlay of an export (<c>--overlay PATH</c>, <c>overlay = PATH</c>; issue 14): a qcow2 image whose
/// backing file is the export's image, created on first use, served through the qcow2 backend in place of the image.
/// The image itself is only ever opened read-only, as the overlay's backing file.
/// </summary>
internal static class PersistentOverlay
{
    /// <summary>Opens (creating it when missing) the overlay of <paramref name="definition"/>'s image.</summary>
    public static BlockDevice Open(ExportDefinition definition)
    {
        var layers = definition.Layers;
        var overlay = layers.Overlay ?? throw new InvalidOperationException("no overlay");
        var source = definition.Source;
        if (layers.Cow != CowMode.None)
        {
            throw new ConfigurationException($"{source}: the persistent overlay (--overlay, overlay =) and a temporary one (--cow, --cow-per-connection, cow =, copyonwrite =) exclude each other: give one");
        }

        if (layers.Partition is not null || layers.Offset is not null || layers.Length is not null)
        {
            throw new ConfigurationException($"{source}: an overlay's backing file is a whole image, so --overlay cannot be combined with --partition, --offset or --size (serve the range from an extracted copy instead)");
        }

        if (definition.Backend != "file")
        {
            throw new ConfigurationException($"{source}: an overlay needs an image file as its base, not a {definition.Backend} export");
        }

        var location = definition.Location ?? throw new ConfigurationException($"{source}: no image to put the overlay on");
        var format = ImageBackend.ParseFormat(definition.Format, source);
        if (definition.Snapshot is not null || ImageBackend.SplitSnapshot(location, format).Snapshot is not null)
        {
            throw new ConfigurationException($"{source}: a qcow2 internal snapshot cannot be an overlay's backing file (qemu has no such backing file either)");
        }

        var options = new Qcow2OverlayOptions
        {
            BaseFormat = format switch { ImageFormat.Raw => "raw", ImageFormat.Qcow2 => "qcow2", _ => null },
            ReadOnly = definition.Options.ReadOnly,
        };
        try
        {
            return Qcow2Overlay.OpenOrCreate(overlay, location, options, out _);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException or ArgumentException)
        {
            // Qcow2FormatException is an IOException: a file that is not this image's overlay, or a damaged one.
            throw new ConfigurationException($"{source}: overlay '{overlay}': {exception.Message}", exception);
        }
    }
}
