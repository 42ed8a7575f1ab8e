using System.CommandLine;
using Spindle.Cli.Hosting;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle serve</c>'s layer options (issue 14): the command-line form of the layer keys of a configuration
/// file's export section (docs/configuration.md), for the one export given on the command line.
/// </summary>
internal sealed class LayerOptions
{
    private readonly Option<bool> _cow = new("--cow")
    {
        Description = "Open IMAGE read-only and keep writes in a temporary sparse overlay, removed when the server stops.",
    };

    private readonly Option<bool> _cowPerConnection = new("--cow-per-connection")
    {
        Description = "Like --cow, but each connection has its own overlay, discarded when it disconnects (nbd-server's copyonwrite).",
    };

    private readonly Option<string?> _overlay = new("--overlay")
    {
        Description = "Keep writes in this qcow2 file, with IMAGE (opened read-only) as its backing file: created when missing, kept across restarts, usable with qemu-img commit and rebase.",
    };

    private readonly Option<string?> _cowDir = new("--cow-dir") { Description = "Where overlay files go [default: $TMPDIR or /tmp]." };

    private readonly Option<int?> _partition = new("--partition") { Description = "Serve partition N (1-4 of an MBR, any of a GPT) of IMAGE." };

    private readonly Option<string?> _offset = new("--offset") { Description = "Serve IMAGE from this byte on (e.g. 1M) [default: 0]." };

    private readonly Option<string?> _size = new("--size") { Description = "Serve this many bytes from --offset (e.g. 100M) [default: to the end]." };

    private readonly Option<string?> _rate = new("--rate") { Description = "Limit reads and writes to BYTES per second, all connections together (e.g. 10M)." };

    private readonly Option<string?> _rateBurst = new("--rate-burst") { Description = "Bytes that may pass at once after a quiet spell [default: one second's worth]." };

    private readonly Option<int?> _delayRead = new("--delay-read") { Description = "Wait MS milliseconds before each read." };

    private readonly Option<int?> _delayWrite = new("--delay-write") { Description = "Wait MS milliseconds before each write, trim or zero." };

    private readonly Option<string?> _errorRate = new("--error-rate") { Description = "Fail this fraction of requests on purpose (0.01 or 1%)." };

    private readonly Option<string?> _errorErrno = new("--error-errno") { Description = "The error injected failures get: EIO, ENOSPC, EPERM, ENOMEM, EINVAL, EOVERFLOW, ENOTSUP, ESHUTDOWN [default: EIO]." };

    private readonly Option<string?> _errorCommands = new("--error-commands") { Description = "The commands that may fail: read, write, trim, zero, flush, cache, block-status, comma-separated [default: all]." };

    private readonly Option<int?> _errorSeed = new("--error-seed") { Description = "Seed of the injected failures, for a reproducible run [default: from the clock]." };

    private readonly Option<string?> _logRequests = new("--log-requests") { Description = "Append one line per request to FILE: time, connection, command, offset, length, result, latency." };

    private readonly Option<string[]> _bitmap = new("--bitmap")
    {
        Description = "Keep the crash-safe dirty bitmap NAME of every write, zero and trim, offered as qemu:dirty-bitmap:NAME (repeatable; created all clean if missing: the first backup must be full).",
    };

    private readonly Option<string?> _bitmapGranularity = new("--bitmap-granularity") { Description = "Bytes one bit of a new bitmap covers, a power of two of 512 or more (e.g. 64K) [default: 64K]." };

    private readonly Option<string?> _bitmapDir = new("--bitmap-dir") { Description = "Where bitmap files go [default: beside IMAGE; /var/lib/spindle/bitmaps for a block device]." };

    public void AddTo(Command command)
    {
        command.Options.Add(_bitmap);
        command.Options.Add(_bitmapGranularity);
        command.Options.Add(_bitmapDir);
        command.Options.Add(_rate);
        command.Options.Add(_rateBurst);
        command.Options.Add(_delayRead);
        command.Options.Add(_delayWrite);
        command.Options.Add(_errorRate);
        command.Options.Add(_errorErrno);
        command.Options.Add(_errorCommands);
        command.Options.Add(_errorSeed);
        command.Options.Add(_logRequests);
        command.Options.Add(_cow);
        command.Options.Add(_cowPerConnection);
        command.Options.Add(_cowDir);
        command.Options.Add(_overlay);
        command.Options.Add(_partition);
        command.Options.Add(_offset);
        command.Options.Add(_size);
    }

    /// <summary>Sets the layers of the command line's export; a clear error with --config or --dir.</summary>
    public void Apply(ParseResult parse, ServerConfiguration configuration, bool fromConfigFile)
    {
        var settings = new LayerSettings
        {
            Cow = parse.GetValue(_cowPerConnection) ? CowMode.PerConnection : parse.GetValue(_cow) ? CowMode.Shared : CowMode.None,
            CowDirectory = parse.GetValue(_cowDir),
            Partition = parse.GetValue(_partition),
            Offset = parse.GetValue(_offset) is { } offset ? SizeParser.Parse(offset, "--offset") : null,
            Length = parse.GetValue(_size) is { } size ? SizeParser.Parse(size, "--size") : null,
            Rate = parse.GetValue(_rate) is { } rate ? Positive(SizeParser.Parse(rate, "--rate"), "--rate") : null,
            RateBurst = parse.GetValue(_rateBurst) is { } burst ? Positive(SizeParser.Parse(burst, "--rate-burst"), "--rate-burst") : null,
            DelayRead = Milliseconds(parse.GetValue(_delayRead), "--delay-read"),
            DelayWrite = Milliseconds(parse.GetValue(_delayWrite), "--delay-write"),
            ErrorRate = parse.GetValue(_errorRate) is { } errorRate ? LayerSettings.ParseProbability(errorRate, "--error-rate") : null,
            ErrorCode = parse.GetValue(_errorErrno) is { } errno ? LayerSettings.ParseErrno(errno, "--error-errno") : Spindle.Protocol.NbdError.IO,
            ErrorCommands = parse.GetValue(_errorCommands) is { } commands ? LayerSettings.ParseCommands(commands, "--error-commands") : Spindle.Storage.Layers.FilterCommands.All,
            ErrorSeed = parse.GetValue(_errorSeed),
            LogRequests = parse.GetValue(_logRequests),
            BitmapGranularity = parse.GetValue(_bitmapGranularity) is { } granularity ? SizeParser.Parse(granularity, "--bitmap-granularity") : null,
            BitmapDirectory = parse.GetValue(_bitmapDir),
            Overlay = parse.GetValue(_overlay),
        };
        settings.Bitmaps.AddRange(parse.GetValue(_bitmap) ?? []);
        if (settings.IsEmpty && settings.CowDirectory is null && settings.RateBurst is null && settings.BitmapGranularity is null && settings.BitmapDirectory is null)
        {
            return;
        }

        if (parse.GetValue(_cow) && parse.GetValue(_cowPerConnection))
        {
            throw new ConfigurationException("give --cow or --cow-per-connection, not both");
        }

        if (fromConfigFile || configuration.Exports.Count != 1 || configuration.Exports[0].Backend == "directory")
        {
            throw new ConfigurationException("the layer options (--cow, --partition, --offset, --bitmap, --rate, --error-rate, --log-requests...) apply to one IMAGE or --memory disk (in a configuration file: the layer keys in the export's section, docs/configuration.md)");
        }

        var layers = configuration.Exports[0].Layers;
        layers.Cow = settings.Cow;
        layers.CowDirectory = settings.CowDirectory;
        layers.Partition = settings.Partition;
        layers.Offset = settings.Offset;
        layers.Length = settings.Length;
        layers.Rate = settings.Rate;
        layers.RateBurst = settings.RateBurst;
        layers.DelayRead = settings.DelayRead;
        layers.DelayWrite = settings.DelayWrite;
        layers.ErrorRate = settings.ErrorRate;
        layers.ErrorCode = settings.ErrorCode;
        layers.ErrorCommands = settings.ErrorCommands;
        layers.ErrorSeed = settings.ErrorSeed;
        layers.LogRequests = settings.LogRequests;
        layers.Bitmaps.Clear();
        layers.Bitmaps.AddRange(settings.Bitmaps);
        layers.BitmapGranularity = settings.BitmapGranularity;
        layers.BitmapDirectory = settings.BitmapDirectory;
        layers.Overlay = settings.Overlay;
    }

    private static long Positive(long value, string option) =>
        value > 0 ? value : throw new ConfigurationException($"{option} must be more than 0");

    private static TimeSpan? Milliseconds(int? value, string option) => value switch
    {
        null => null,
        < 0 or > 3_600_000 => throw new ConfigurationException($"{option} must be from 0 to 3600000 milliseconds"),
        _ => TimeSpan.FromMilliseconds(value.Value),
    };
}
