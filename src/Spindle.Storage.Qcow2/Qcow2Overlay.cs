namespace Spindle.Storage.Qcow2;

/// <summary>How <see cref="Qcow2Overlay.OpenOrCreate"/> opens or creates a persistent overlay.</summary>
public sealed class Qcow2OverlayOptions
{
    /// <summary>
    /// The base's format, "raw" or "qcow2". Default: null, the format an existing overlay records, or for a new one
    /// the base's detected format. When given, an existing overlay recording another format is refused.
    /// </summary>
    public string? BaseFormat { get; init; }

    /// <summary>
    /// Open the overlay read-only. Default: false. A read-only overlay is never created: a missing one is refused.
    /// </summary>
    public bool ReadOnly { get; init; }

    /// <summary>The cluster size of a new overlay. Default: 64 KiB, as qemu-img create.</summary>
    public int ClusterSize { get; init; } = 64 * 1024;
}

/// <summary>
/// A persistent copy-on-write overlay: a qcow2 image whose backing file is the base (issue 14), so its writes
/// survive restarts and qemu-img commit, rebase and convert understand it. It is the image <c>qemu-img create -f
/// qcow2 -b BASE -F FMT OVERLAY</c> would make, created on first use and checked against the base on every later one.
/// </summary>
public static class Qcow2Overlay
{
    /// <summary>
    /// Opens <paramref name="overlayPath"/>, creating it first when it does not exist, as an overlay of
    /// <paramref name="basePath"/>. An existing file must be a qcow2 image whose backing file is the base (the same
    /// file, however named): anything else is refused, since serving it would show another disk's data, or write
    /// into a file that is not an overlay at all.
    /// </summary>
    /// <param name="overlayPath">The overlay image.</param>
    /// <param name="basePath">The base image, raw or qcow2: opened read-only, never written.</param>
    /// <param name="options">How; null for the defaults.</param>
    /// <param name="created">Whether this call created the overlay.</param>
    /// <exception cref="Qcow2FormatException">The overlay exists and is not an overlay of this base in this format.</exception>
    /// <exception cref="FileNotFoundException">The base does not exist, or a read-only overlay does not.</exception>
    public static Qcow2Image OpenOrCreate(string overlayPath, string basePath, Qcow2OverlayOptions? options, out bool created)
    {
        ArgumentException.ThrowIfNullOrEmpty(overlayPath);
        ArgumentException.ThrowIfNullOrEmpty(basePath);
        options ??= new Qcow2OverlayOptions();
        var overlay = Path.GetFullPath(overlayPath);
        var baseImage = Path.GetFullPath(basePath);
        if (!File.Exists(baseImage))
        {
            throw new FileNotFoundException($"the base image '{baseImage}' does not exist", baseImage);
        }

        if (Directory.Exists(overlay))
        {
            throw new Qcow2FormatException($"the overlay '{overlay}' is a directory");
        }

        created = false;
        if (!File.Exists(overlay))
        {
            if (options.ReadOnly)
            {
                throw new FileNotFoundException($"the overlay '{overlay}' does not exist, and a read-only export does not create it", overlay);
            }

            try
            {
                Qcow2Image.Create(overlay, new Qcow2CreateOptions
                {
                    BackingFile = BackingNameFor(overlay, baseImage),
                    BackingFormat = options.BaseFormat,
                    ClusterSize = options.ClusterSize,
                });
                created = true;
            }
            catch (IOException) when (File.Exists(overlay))
            {
                // Someone else created it in the meantime: it is checked like any existing overlay.
            }
        }

        Verify(overlay, baseImage, options.BaseFormat);
        // The backing file is opened read-only by the qcow2 backend, whatever the overlay's own mode.
        return Qcow2Image.Open(overlay, new Qcow2OpenOptions { ReadOnly = options.ReadOnly });
    }

    /// <summary>
    /// The backing file name a new overlay records: relative to the overlay's directory when the base lies in it or
    /// below it (the pair can then be moved together, as with <c>qemu-img create -b base.img</c>), else the absolute
    /// path (a name climbing out with "../" could resolve differently through a symbolic link).
    /// </summary>
    public static string BackingNameFor(string overlayPath, string basePath)
    {
        var overlay = Path.GetFullPath(overlayPath);
        var baseImage = Path.GetFullPath(basePath);
        var relative = Path.GetRelativePath(Path.GetDirectoryName(overlay) ?? "/", baseImage);
        return Path.IsPathRooted(relative) || relative == ".." || relative.StartsWith("../", StringComparison.Ordinal) ? baseImage : relative;
    }

    /// <summary>Refuses an existing <paramref name="overlay"/> that is not a qcow2 overlay of <paramref name="baseImage"/>.</summary>
    private static void Verify(string overlay, string baseImage, string? format)
    {
        using var overlayHandle = File.OpenHandle(overlay, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        using var baseHandle = File.OpenHandle(baseImage, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        if (AtomicFile.SameFile(overlayHandle, baseHandle))
        {
            throw new Qcow2FormatException($"the overlay '{overlay}' and the base '{baseImage}' are the same file");
        }

        if (!Qcow2Image.IsQcow2File(overlayHandle))
        {
            throw new Qcow2FormatException($"'{overlay}' exists and is not a qcow2 image, so it cannot be the overlay of '{baseImage}' (give a path that does not exist to create one)");
        }

        var header = Qcow2Image.ReadHeaderOf(overlayHandle, overlay);
        if (header.BackingFile is not { } name)
        {
            throw new Qcow2FormatException($"'{overlay}' is a qcow2 image without a backing file, not an overlay of '{baseImage}'");
        }

        var directory = Path.GetDirectoryName(overlay) ?? "/";
        var backingPath = name.Contains("://", StringComparison.Ordinal) || name.StartsWith("json:", StringComparison.Ordinal)
            ? null
            : Path.GetFullPath(Path.IsPathRooted(name) ? name : Path.Combine(directory, name));
        if (backingPath is null || !File.Exists(backingPath))
        {
            throw new Qcow2FormatException($"'{overlay}' is an overlay of '{name}'{(backingPath is null ? string.Empty : $" ({backingPath}, which does not exist)")}, not of '{baseImage}'");
        }

        using (var backingHandle = File.OpenHandle(backingPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete))
        {
            if (!AtomicFile.SameFile(backingHandle, baseHandle))
            {
                throw new Qcow2FormatException($"'{overlay}' is an overlay of '{backingPath}', not of '{baseImage}'; refusing to serve another image's overlay (rebase it with qemu-img rebase if the base was moved)");
            }
        }

        var recorded = header.BackingFormat ?? (Qcow2Image.IsQcow2File(baseHandle) ? "qcow2" : "raw");
        if (format is not null && !string.Equals(format, recorded, StringComparison.Ordinal))
        {
            throw new Qcow2FormatException($"'{overlay}' reads its base '{baseImage}' as {recorded}{(header.BackingFormat is null ? " (probed)" : string.Empty)}, not as {format} as the format given says");
        }
    }
}
