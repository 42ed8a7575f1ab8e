using Spindle.Storage;
using Spindle.Storage.Layers;

namespace Spindle.Cli.Hosting;

/// <summary>Which copy-on-write overlay an export has.</summary>
public enum CowMode
{
    /// <summary>None: writes reach the backend.</summary>
    None,

    /// <summary>One overlay shared by every connection, removed when the server stops (<c>--cow</c>, <c>cow = true</c>).</summary>
    Shared,

    /// <summary>One overlay per connection, discarded at disconnect (nbd-server's <c>copyonwrite = true</c>).</summary>
    PerConnection,
}

/// <summary>
/// The layers an export stacks on its backend (issue 14), from command-line options or configuration keys. Their
/// order is fixed, bottom up: the range (a partition, or an offset and length) on the backend, then the overlay,
/// so an overlay over a partition never writes the disk, then the dirty bitmaps (which record what the client
/// changed, whatever lies below), then the filters and the request log. An export with none of them is served from the backend
/// itself, with no layer in between.
/// </summary>
public sealed class LayerSettings
{
    /// <summary>The copy-on-write overlay. Default: none.</summary>
    public CowMode Cow { get; set; }

    /// <summary>Where overlay files go (nbd-server's <c>cowdir</c>). Default: null, $TMPDIR (or /tmp).</summary>
    public string? CowDirectory { get; set; }

    /// <summary>Serve partition N (1-based) of an MBR or GPT disk. Default: null, the whole device.</summary>
    public int? Partition { get; set; }

    /// <summary>Serve from this byte on. Default: null, from 0.</summary>
    public long? Offset { get; set; }

    /// <summary>Serve this many bytes. Default: null, to the end of the device.</summary>
    public long? Length { get; set; }

    /// <summary>Limit READ and WRITE to this many bytes per second, for the whole export. Default: null, no limit.</summary>
    public long? Rate { get; set; }

    /// <summary>Bytes that may pass at once after a quiet spell. Default: null, one second's worth of <see cref="Rate"/>.</summary>
    public long? RateBurst { get; set; }

    /// <summary>Wait this long before each read. Default: null, no delay.</summary>
    public TimeSpan? DelayRead { get; set; }

    /// <summary>Wait this long before each write, trim or zero. Default: null, no delay.</summary>
    public TimeSpan? DelayWrite { get; set; }

    /// <summary>Fail this fraction (0 to 1) of requests on purpose. Default: null, never.</summary>
    public double? ErrorRate { get; set; }

    /// <summary>The error injected failures reply. Default: EIO.</summary>
    public Spindle.Protocol.NbdError ErrorCode { get; set; } = Spindle.Protocol.NbdError.IO;

    /// <summary>The commands that may fail. Default: all.</summary>
    public FilterCommands ErrorCommands { get; set; } = FilterCommands.All;

    /// <summary>Seed of the injected failures, for a reproducible run. Default: null, from the clock.</summary>
    public int? ErrorSeed { get; set; }

    /// <summary>Log every request to this file. Default: null, no log.</summary>
    public string? LogRequests { get; set; }

    /// <summary>
    /// Dirty bitmaps kept of every write, zero and trim (<c>--bitmap NAME</c>, <c>bitmap = a, b</c>; docs/bitmaps.md),
    /// each created all clean when missing. Default: none.
    /// </summary>
    public List<string> Bitmaps { get; } = [];

    /// <summary>
    /// Bytes one bit of a new bitmap covers (a power of two, 512 or more). Default: null, 64 KiB for a new bitmap and
    /// whatever an existing one was made with (given and different: refused).
    /// </summary>
    public long? BitmapGranularity { get; set; }

    /// <summary>
    /// Where bitmap files go. Default: null, beside an image file, and in /var/lib/spindle/bitmaps for a block device.
    /// </summary>
    public string? BitmapDirectory { get; set; }

    /// <summary>
    /// A persistent overlay: this qcow2 file, with the image as its backing file, created when missing and served
    /// in place of the image (<see cref="PersistentOverlay"/>). Default: null, none.
    /// </summary>
    public string? Overlay { get; set; }

    /// <summary>Every setting in one string: a reload that changes any of them reopens the export's device.</summary>
    public string Fingerprint => string.Join('|', Cow, CowDirectory, Partition, Offset, Length, Rate, RateBurst, DelayRead, DelayWrite,
        ErrorRate?.ToString(System.Globalization.CultureInfo.InvariantCulture), ErrorCode, ErrorCommands, ErrorSeed, LogRequests,
        string.Join(',', Bitmaps), BitmapGranularity, BitmapDirectory) + "|overlay=" + Overlay;

    /// <summary>True when the export has no layer at all.</summary>
    public bool IsEmpty => Cow == CowMode.None && Partition is null && Offset is null && Length is null &&
        Rate is null && DelayRead is null && DelayWrite is null && ErrorRate is null && LogRequests is null &&
        Overlay is null && Bitmaps.Count == 0;

    /// <summary>Parses an errno name (EIO, ENOSPC, EPERM, ENOMEM, EINVAL, EOVERFLOW, ENOTSUP, ESHUTDOWN).</summary>
    public static Spindle.Protocol.NbdError ParseErrno(string text, string where) => text.Trim().ToUpperInvariant() switch
    {
        "EIO" => Spindle.Protocol.NbdError.IO,
        "EPERM" => Spindle.Protocol.NbdError.NotPermitted,
        "ENOMEM" => Spindle.Protocol.NbdError.OutOfMemory,
        "EINVAL" => Spindle.Protocol.NbdError.InvalidArgument,
        "ENOSPC" => Spindle.Protocol.NbdError.NoSpace,
        "EOVERFLOW" => Spindle.Protocol.NbdError.Overflow,
        "ENOTSUP" or "EOPNOTSUPP" => Spindle.Protocol.NbdError.NotSupported,
        "ESHUTDOWN" => Spindle.Protocol.NbdError.Shutdown,
        _ => throw new ConfigurationException($"{where}: '{text}' is not an NBD errno (EIO, ENOSPC, EPERM, ENOMEM, EINVAL, EOVERFLOW, ENOTSUP, ESHUTDOWN)"),
    };

    /// <summary>Parses a command list: read, write, trim, zero, flush, cache, block-status, or all, comma-separated.</summary>
    public static FilterCommands ParseCommands(string text, string where)
    {
        var commands = FilterCommands.None;
        foreach (var name in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            commands |= name.ToLowerInvariant() switch
            {
                "read" => FilterCommands.Read,
                "write" => FilterCommands.Write,
                "trim" => FilterCommands.Trim,
                "zero" or "write_zeroes" or "write-zeroes" => FilterCommands.Zero,
                "flush" => FilterCommands.Flush,
                "cache" => FilterCommands.Cache,
                "block-status" or "block_status" or "extents" => FilterCommands.BlockStatus,
                "all" => FilterCommands.All,
                _ => throw new ConfigurationException($"{where}: unknown command '{name}' (read, write, trim, zero, flush, cache, block-status, all)"),
            };
        }

        return commands == FilterCommands.None ? throw new ConfigurationException($"{where}: no command named") : commands;
    }

    /// <summary>Parses a probability: 0.01, or a percentage such as 1%.</summary>
    public static double ParseProbability(string text, string where)
    {
        var trimmed = text.Trim();
        var percent = trimmed.EndsWith('%');
        if (!double.TryParse(percent ? trimmed[..^1] : trimmed, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var value))
        {
            throw new ConfigurationException($"{where}: '{text}' is not a probability (0.01 or 1%)");
        }

        value = percent ? value / 100 : value;
        return value is >= 0 and <= 1 ? value : throw new ConfigurationException($"{where}: the probability must be from 0 to 1 (0% to 100%), not '{text}'");
    }
}

/// <summary>Opens an export's backend and stacks its layers on it.</summary>
internal static class LayerStack
{
    public static async ValueTask<BlockDevice> OpenAsync(ExportDefinition definition, CancellationToken cancellationToken)
    {
        var layers = definition.Layers;
        if (layers.RateBurst is not null && layers.Rate is null)
        {
            throw new ConfigurationException($"{definition.Source}: a rate burst needs a rate (--rate, rate = BYTES)");
        }

        if (layers.Bitmaps.Count == 0 && (layers.BitmapGranularity is not null || layers.BitmapDirectory is not null))
        {
            throw new ConfigurationException($"{definition.Source}: a bitmap granularity or directory needs a bitmap (--bitmap NAME, bitmap = NAME)");
        }

        if (layers.IsEmpty)
        {
            return BackendFactory.Open(definition);
        }

        if (layers.Partition is not null && (layers.Offset is not null || layers.Length is not null))
        {
            throw new ConfigurationException($"{definition.Source}: give a partition or an offset and length, not both");
        }

        // Under an overlay the backend is opened read-only: the base is never written, whatever reaches the overlay.
        var options = definition.Options;
        var readOnly = options.ReadOnly;
        options.ReadOnly = readOnly || layers.Cow != CowMode.None;
        BlockDevice device;
        try
        {
            // A persistent overlay is a qcow2 image opening the backend (its backing file) read-only itself.
            device = layers.Overlay is null ? BackendFactory.Open(definition) : PersistentOverlay.Open(definition);
        }
        finally
        {
            options.ReadOnly = readOnly;
        }

        try
        {
            if (layers.Partition is { } number)
            {
                var partition = await PartitionTable.FindAsync(device, number, cancellationToken).ConfigureAwait(false);
                device = new RangeDevice(device, partition.Offset, partition.Length, ownsInner: true);
            }
            else if (layers.Offset is not null || layers.Length is not null)
            {
                var offset = layers.Offset ?? 0;
                if (offset > device.Size)
                {
                    throw new ConfigurationException($"{definition.Source}: offset {offset} is past the end of {device.Description} ({device.Size} bytes)");
                }

                device = new RangeDevice(device, offset, layers.Length ?? (device.Size - offset), ownsInner: true);
            }

            if (layers.CowDirectory is { } directory && !Directory.Exists(directory))
            {
                throw new ConfigurationException($"{definition.Source}: the overlay directory '{directory}' does not exist");
            }

            device = layers.Cow switch
            {
                CowMode.Shared => new CowOverlayDevice(device, layers.CowDirectory, ownsBase: true),
                CowMode.PerConnection => new PerConnectionCowDevice(device, layers.CowDirectory, ownsBase: true),
                _ => device,
            };

            if (layers.Bitmaps.Count > 0)
            {
                device = BitmapLayer.Open(definition, device);
            }

            // The filters sit above the data layers so a client sees their effect, and the log on top sees it all
            // (injected errors, delays and waits for the rate included).
            if (layers.ErrorRate is { } probability)
            {
                device = new ErrorInjectionDevice(device, new ErrorInjectionOptions { Probability = probability, Error = layers.ErrorCode, Commands = layers.ErrorCommands, Seed = layers.ErrorSeed }, ownsInner: true);
            }

            if (layers.DelayRead is not null || layers.DelayWrite is not null)
            {
                device = new DelayDevice(device, layers.DelayRead ?? TimeSpan.Zero, layers.DelayWrite ?? TimeSpan.Zero, ownsInner: true);
            }

            if (layers.Rate is { } rate)
            {
                device = new RateLimitDevice(device, rate, layers.RateBurst, ownsInner: true);
            }

            if (layers.LogRequests is { } log)
            {
                device = new RequestLogDevice(device, log, ownsInner: true);
            }

            return device;
        }
        catch (Exception exception) when (exception is InvalidDataException or ArgumentOutOfRangeException or IOException or UnauthorizedAccessException or ConfigurationException)
        {
            await device.DisposeAsync().ConfigureAwait(false);
            throw exception as ConfigurationException ?? new ConfigurationException($"{definition.Source}: {exception.Message}", exception);
        }
    }
}
