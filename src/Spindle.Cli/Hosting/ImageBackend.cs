using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Storage.Qcow2;

namespace Spindle.Cli.Hosting;

/// <summary>The format of an image file: detected from its first bytes, or given (qemu-nbd's <c>-f</c>).</summary>
internal enum ImageFormat
{
    /// <summary>qcow2 when the file starts with the qcow2 magic, else raw (what qemu-nbd does without -f).</summary>
    Auto,

    /// <summary>The file's bytes are the disk's bytes.</summary>
    Raw,

    /// <summary>A qcow2 image, served through <see cref="Qcow2Image"/>.</summary>
    Qcow2,
}

/// <summary>
/// Opens local image files (serve, directory exports, mount, attach, copy) in their format: raw files as
/// <see cref="FileBlockDevice"/>, qcow2 images as <see cref="Qcow2Image"/>, an internal snapshot as
/// <c>disk.qcow2@snap</c>. Format problems become <see cref="ConfigurationException"/>s naming the file.
/// </summary>
internal static class ImageBackend
{
    /// <summary>The words <c>--format</c> and the <c>format</c> key take.</summary>
    public const string FormatWords = "raw, qcow2 or auto";

    public static ImageFormat ParseFormat(string? text, string where) => text?.Trim().ToLowerInvariant() switch
    {
        null or "" or "auto" => ImageFormat.Auto,
        "raw" => ImageFormat.Raw,
        "qcow2" => ImageFormat.Qcow2,
        _ => throw new ConfigurationException($"{where}: format '{text}' is not one of {FormatWords}"),
    };

    /// <summary>
    /// Splits <c>FILE@SNAPSHOT</c> when <paramref name="location"/> itself does not exist but FILE does and is a
    /// qcow2 image: a file whose name contains '@' is served as it is whenever it exists, so the suffix never
    /// changes what an existing name means.
    /// </summary>
    public static (string Path, string? Snapshot) SplitSnapshot(string location, ImageFormat format)
    {
        var at = location.LastIndexOf('@');
        if (format == ImageFormat.Raw || at <= 0 || at == location.Length - 1 || File.Exists(location) || Directory.Exists(location))
        {
            return (location, null);
        }

        var path = location[..at];
        try
        {
            return File.Exists(path) && Qcow2Image.IsQcow2File(path) ? (path, location[(at + 1)..]) : (location, null);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return (location, null);
        }
    }

    /// <summary>
    /// Opens the file export <paramref name="definition"/> names in its format. An internal snapshot is served
    /// read-only: the definition is made read-only.
    /// </summary>
    public static BlockDevice OpenExport(ExportDefinition definition)
    {
        var location = definition.Location ?? throw new ConfigurationException($"{definition.Source}: no file to serve");
        var format = ParseFormat(definition.Format, definition.Source);
        var (path, snapshot) = definition.Snapshot is { } named ? (location, named) : SplitSnapshot(location, format);
        if (snapshot is not null)
        {
            if (format == ImageFormat.Raw)
            {
                throw new ConfigurationException($"{definition.Source}: a snapshot ('{snapshot}') needs a qcow2 image, and the format is raw");
            }

            format = ImageFormat.Qcow2;
            definition.Options.ReadOnly = true;
        }

        return Open(path, format, definition.Options.ReadOnly, definition.Size, snapshot, hint: " (serve it read-only with -r if you may only read it)");
    }

    /// <summary>
    /// Opens a local file or block device in <paramref name="format"/> (detected with <see cref="ImageFormat.Auto"/>).
    /// <paramref name="createSize"/> creates a missing file as a sparse raw file.
    /// </summary>
    public static BlockDevice Open(string path, ImageFormat format, bool readOnly, long? createSize = null, string? snapshot = null, string hint = "")
    {
        try
        {
            if (format == ImageFormat.Auto && File.Exists(path))
            {
                format = Qcow2Image.IsQcow2File(path) ? ImageFormat.Qcow2 : ImageFormat.Raw;
            }

            if (format != ImageFormat.Qcow2)
            {
                return FileBlockDevice.Open(path, readOnly, createSize);
            }

            if (!File.Exists(path))
            {
                throw new ConfigurationException(createSize is null
                    ? $"'{path}' does not exist"
                    : $"'{path}' does not exist; create a qcow2 image with: qemu-img create -f qcow2 {path} SIZE");
            }

            return Qcow2Image.Open(path, new Qcow2OpenOptions { ReadOnly = readOnly, Snapshot = snapshot });
        }
        catch (Qcow2FormatException exception)
        {
            throw new ConfigurationException($"cannot open '{path}' as qcow2: {exception.Message}");
        }
        catch (FileNotFoundException exception) when (exception.FileName is { } missing && Path.GetFullPath(missing) != Path.GetFullPath(path))
        {
            throw new ConfigurationException($"cannot open '{path}': {exception.Message}");
        }
        catch (FileNotFoundException)
        {
            throw new ConfigurationException($"'{path}' does not exist (give a size to create it: --create SIZE on the command line, filesize = SIZE in a configuration file)");
        }
        catch (UnauthorizedAccessException exception)
        {
            throw new ConfigurationException($"cannot open '{path}': {exception.Message}{(readOnly ? string.Empty : hint)}");
        }
        catch (IOException exception)
        {
            throw new ConfigurationException($"cannot open '{path}': {exception.Message}");
        }
    }

    /// <summary>
    /// The <see cref="DirectoryExportOptions.OpenImage"/> hook: serves each image of a directory export in its
    /// format, its backing files confined to the same directory.
    /// </summary>
    public static Func<DirectoryImage, BlockDevice> DirectoryOpener(ImageFormat format) => image =>
    {
        bool qcow2;
        try
        {
            qcow2 = format == ImageFormat.Qcow2 || (format == ImageFormat.Auto && Qcow2Image.IsQcow2File(image.Handle));
        }
        catch
        {
            image.Handle.Dispose();
            throw;
        }

        if (!qcow2)
        {
            return FileBlockDevice.FromHandle(image.Handle, image.Path, image.ReadOnly);
        }

        try
        {
            return Qcow2Image.Open(image.Handle, image.Path, new Qcow2OpenOptions { ReadOnly = image.ReadOnly, OpenBackingFile = image.OpenBeneathRoot });
        }
        catch (Qcow2FormatException exception)
        {
            throw new IOException($"not a usable qcow2 image: {exception.Message}", exception);
        }
    };

    /// <summary>What the backend noticed at open and the user should know (qcow2: ignored bitmaps and the like).</summary>
    public static IReadOnlyList<string> WarningsOf(BlockDevice device) => device is Qcow2Image image ? image.Warnings : [];

    /// <summary>A one-line description of the image for the log: version, clusters, backing chain, bitmaps.</summary>
    public static string? Describe(BlockDevice device) => device is Qcow2Image image
        ? $"version {image.Version}, {image.ClusterSize}-byte clusters{(image.HasSubclusters ? ", subclusters" : string.Empty)}" +
          $"{(image.BackingChain.Count > 0 ? ", backing " + string.Join(" <- ", image.BackingChain) : string.Empty)}" +
          $"{(image.Bitmaps.Count > 0 ? ", bitmaps " + string.Join(", ", image.Bitmaps.Select(b => b.Usable ? b.Name : b.Name + " (unusable)")) : string.Empty)}"
        : null;
}
