using Spindle.Cli.Hosting;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>How a mount source is opened.</summary>
/// <param name="ReadOnly">Open it read-only (the mounted file is then read-only too).</param>
/// <param name="CreateSize">Create a missing file source, sparse, with this size.</param>
internal sealed record MountSourceOptions(bool ReadOnly, long? CreateSize)
{
    /// <summary>More NBD URIs serving the same export as the source (multipath).</summary>
    public IReadOnlyList<string> Paths { get; init; } = [];

    /// <summary>How long an NBD source may stay unreachable before requests fail (null: the client's default).</summary>
    public TimeSpan? DeadTimeout { get; init; }

    /// <summary>ADDR:PORT of the client's metrics endpoint and status page (--metrics), or null.</summary>
    public string? Metrics { get; init; }

    /// <summary>Connections per NBD path when the export advertises multi-conn.</summary>
    public int Connections { get; init; } = 1;

    /// <summary>Where an NBD source logs (connection lost, reconnected...).</summary>
    public Microsoft.Extensions.Logging.ILoggerFactory? LoggerFactory { get; init; }
}

/// <summary>Opens the block device behind a mount or attach source.</summary>
/// <param name="uri">The source URI, e.g. <c>nbd://server:10809/export</c>.</param>
/// <param name="options">Read-only and the like.</param>
/// <param name="cancellationToken">Cancels connecting.</param>
internal delegate ValueTask<BlockDevice> MountUriOpener(Uri uri, MountSourceOptions options, CancellationToken cancellationToken);

/// <summary>
/// What <c>spindle mount</c> and <c>spindle attach</c> expose: a local file or block device (raw, or a qcow2 image's
/// virtual disk), <c>memory:SIZE</c>,
/// or a URI whose scheme has been registered with <see cref="RegisterUriScheme"/>.
/// </summary>
/// <remarks>
/// <para><b>Extension point for the NBD client.</b> The device layer takes any <see cref="BlockDevice"/>; an NBD
/// export plugs in as a small adapter (a <see cref="BlockDevice"/> whose Size and Features come from the negotiated
/// export, and whose Read/Write(fua)/Flush/Trim/WriteZeroes send the matching NBD commands through the client,
/// which owns reconnection and replay), registered at start-up for each NBD scheme:</para>
/// <code>
/// foreach (var scheme in MountSource.NbdSchemes)
///     MountSource.RegisterUriScheme(scheme, (uri, options, ct) => NbdBlockDevice.ConnectAsync(uri, options.ReadOnly, ct));
/// </code>
/// <para><see cref="NbdMountSource"/> is that registration.</para>
/// </remarks>
internal static class MountSource
{
    /// <summary>The URI schemes of NBD (nbd-uri specification), handled once the NBD client registers them.</summary>
    public static readonly IReadOnlyList<string> NbdSchemes = ["nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock"];

    private const string MemoryPrefix = "memory:";

    private static readonly Dictionary<string, MountUriOpener> UriOpeners = new(StringComparer.OrdinalIgnoreCase);

    /// <summary>Makes <paramref name="scheme"/>:// sources open through <paramref name="open"/>.</summary>
    public static void RegisterUriScheme(string scheme, MountUriOpener open)
    {
        ArgumentException.ThrowIfNullOrEmpty(scheme);
        ArgumentNullException.ThrowIfNull(open);
        lock (UriOpeners)
        {
            UriOpeners[scheme] = open;
        }
    }

    /// <summary>Opens <paramref name="source"/>.</summary>
    /// <exception cref="ConfigurationException">The source cannot be used; the message says why and what to do.</exception>
    public static async ValueTask<BlockDevice> OpenAsync(string source, MountSourceOptions options, CancellationToken cancellationToken)
    {
        ArgumentException.ThrowIfNullOrEmpty(source);
        if (TryGetScheme(source, out var scheme))
        {
            MountUriOpener? open;
            lock (UriOpeners)
            {
                UriOpeners.TryGetValue(scheme, out open);
            }

            if (open is null)
            {
                throw new ConfigurationException(NbdSchemes.Contains(scheme, StringComparer.OrdinalIgnoreCase)
                    ? $"'{source}': NBD URI sources arrive with the NBD client library (not built yet); until then give a local file, a block device or memory:SIZE"
                    : $"'{source}': unknown source scheme '{scheme}' (give a file, a block device or memory:SIZE)");
            }

            if (!Uri.TryCreate(source, UriKind.Absolute, out var uri))
            {
                throw new ConfigurationException($"'{source}' is not a valid URI");
            }

            return await open(uri, options, cancellationToken).ConfigureAwait(false);
        }

        if (options.Paths.Count > 0)
        {
            throw new ConfigurationException($"--path adds paths to an NBD URI source, not to '{source}'");
        }

        if (source.StartsWith(MemoryPrefix, StringComparison.OrdinalIgnoreCase))
        {
            var size = SizeParser.Parse(source[MemoryPrefix.Length..], "memory:SIZE");
            if (size > MemoryBlockDevice.MaxSize)
            {
                throw new ConfigurationException($"'{source}': memory devices are limited to 16 TiB");
            }

            return new MemoryBlockDevice(size, options.ReadOnly);
        }

        // A qcow2 image exposes its virtual disk (FILE@SNAPSHOT an internal snapshot, read-only); anything else raw.
        var (path, snapshot) = ImageBackend.SplitSnapshot(source, ImageFormat.Auto);
        if (snapshot is not null && !options.ReadOnly)
        {
            throw new ConfigurationException($"'{source}' is an internal snapshot of {path}, which can only be read: add --read-only");
        }

        if (options.CreateSize is not null || File.Exists(path) || path.StartsWith("/dev/", StringComparison.Ordinal))
        {
            return ImageBackend.Open(path, snapshot is null ? ImageFormat.Auto : ImageFormat.Qcow2, options.ReadOnly, options.CreateSize, snapshot, " (use --read-only if you may only read it)");
        }

        throw new ConfigurationException($"'{source}' does not exist (give --create SIZE to create it, or memory:SIZE for a disk in memory)");
    }

    /// <summary>A short name for the source, usable as a directory name: the file name, the export name, or "memory".</summary>
    public static string SuggestName(string source)
    {
        string raw;
        if (TryGetScheme(source, out _) && Uri.TryCreate(source, UriKind.Absolute, out var uri))
        {
            var export = Uri.UnescapeDataString(uri.AbsolutePath.Trim('/'));
            raw = export.Length > 0 ? export : uri.Host.Length > 0 ? uri.Host : "nbd";
        }
        else if (source.StartsWith(MemoryPrefix, StringComparison.OrdinalIgnoreCase))
        {
            raw = "memory";
        }
        else
        {
            raw = Path.GetFileNameWithoutExtension(source.TrimEnd('/'));
        }

        var name = new string(raw.Select(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.' ? c : '-').ToArray()).Trim('.', '-');
        return name.Length == 0 ? "disk" : name.Length > 64 ? name[..64] : name;
    }

    private static bool TryGetScheme(string source, out string scheme)
    {
        var separator = source.IndexOf("://", StringComparison.Ordinal);
        scheme = separator > 0 ? source[..separator] : string.Empty;
        return separator > 0 && scheme.All(c => char.IsAsciiLetterOrDigit(c) || c is '+' or '-' or '.');
    }
}
