using Spindle.Protocol;

namespace Spindle.Storage.Layers;

/// <summary>The commands a fault filter acts on (<c>--error-commands</c>).</summary>
[Flags]
public enum FilterCommands
{
    None = 0,
    Read = 1 << 0,
    Write = 1 << 1,
    Trim = 1 << 2,
    Zero = 1 << 3,
    Flush = 1 << 4,
    Cache = 1 << 5,
    BlockStatus = 1 << 6,

    /// <summary>Every command.</summary>
    All = Read | Write | Trim | Zero | Flush | Cache | BlockStatus,
}

/// <summary>How the error filter fails requests: which, how often, with what.</summary>
public sealed class ErrorInjectionOptions
{
    /// <summary>The probability, 0 to 1, that a request of <see cref="Commands"/> fails. Default: 0 (never).</summary>
    public double Probability { get; init; }

    /// <summary>The NBD error replied. Default: EIO, the error a failing disk gives.</summary>
    public NbdError Error { get; init; } = NbdError.IO;

    /// <summary>The commands that may fail. Default: all of them.</summary>
    public FilterCommands Commands { get; init; } = FilterCommands.All;

    /// <summary>Seed of the random choice, for a reproducible run; null (the default) seeds from the clock.</summary>
    public int? Seed { get; init; }
}

/// <summary>
/// Fails requests on purpose (issue 14: <c>--error-rate P</c>; nbdkit's error filter), to test what runs above a
/// disk: each request of the chosen commands fails with the chosen error with probability P, before it reaches
/// the device below, so a failed write changes nothing. Other requests pass through untouched.
/// </summary>
public sealed class ErrorInjectionDevice : LayerDevice
{
    private readonly ErrorInjectionOptions _options;
    private readonly Random _random;
    private readonly Lock _lock;

    public ErrorInjectionDevice(BlockDevice inner, ErrorInjectionOptions options, bool ownsInner)
        : this(inner, options, options?.Seed is { } seed ? new Random(seed) : new Random(), new Lock(), ownsInner)
    {
    }

    private ErrorInjectionDevice(BlockDevice inner, ErrorInjectionOptions options, Random random, Lock gate, bool ownsInner)
        : base(inner, ownsInner)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.Probability is < 0 or > 1 || double.IsNaN(options.Probability))
        {
            throw new ArgumentOutOfRangeException(nameof(options), "the error probability must be between 0 and 1");
        }

        _options = options;
        _random = random;
        _lock = gate;
    }

    public override string Description => $"{Inner.Description}, failing {_options.Probability:P1} of requests with {_options.Error.ToErrnoName()}";

    public override ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        Fails(FilterCommands.Read) ? Fail() : Inner.ReadAsync(offset, destination, cancellationToken);

    public override ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken) =>
        Fails(FilterCommands.Write) ? Fail() : Inner.WriteAsync(offset, source, fua, cancellationToken);

    public override ValueTask FlushAsync(CancellationToken cancellationToken) =>
        Fails(FilterCommands.Flush) ? Fail() : Inner.FlushAsync(cancellationToken);

    public override ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken) =>
        Fails(FilterCommands.Trim) ? Fail() : Inner.TrimAsync(offset, length, fua, cancellationToken);

    public override ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken) =>
        Fails(FilterCommands.Zero) ? Fail() : Inner.WriteZeroesAsync(offset, length, flags, cancellationToken);

    public override ValueTask CacheAsync(long offset, long length, CancellationToken cancellationToken) =>
        Fails(FilterCommands.Cache) ? Fail() : Inner.CacheAsync(offset, length, cancellationToken);

    public override ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken) =>
        Fails(FilterCommands.BlockStatus) ? Fail() : Inner.GetExtentsAsync(offset, length, extents, cancellationToken);

    protected override BlockDevice ForConnection(BlockDevice connectionInner) =>
        new ErrorInjectionDevice(connectionInner, _options, _random, _lock, ownsInner: true);

    private bool Fails(FilterCommands command)
    {
        if ((_options.Commands & command) == 0 || _options.Probability <= 0)
        {
            return false;
        }

        lock (_lock)
        {
            return _random.NextDouble() < _options.Probability;
        }
    }

    private ValueTask Fail() =>
        ValueTask.FromException(new BlockDeviceException(_options.Error, $"injected error ({_options.Error.ToErrnoName()})"));
}

/// <summary>
/// Slows requests down (issue 14: <c>--delay-read</c>, <c>--delay-write</c>; nbdkit's delay filter): a read waits
/// the read delay before it starts, a write, trim or zero the write delay. Other commands are not delayed.
/// </summary>
public sealed class DelayDevice : LayerDevice
{
    private readonly TimeSpan _read;
    private readonly TimeSpan _write;

    public DelayDevice(BlockDevice inner, TimeSpan read, TimeSpan write, bool ownsInner)
        : base(inner, ownsInner)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(read, TimeSpan.Zero);
        ArgumentOutOfRangeException.ThrowIfLessThan(write, TimeSpan.Zero);
        _read = read;
        _write = write;
    }

    public override async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        await Task.Delay(_read, cancellationToken).ConfigureAwait(false);
        await Inner.ReadAsync(offset, destination, cancellationToken).ConfigureAwait(false);
    }

    public override async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        await Task.Delay(_write, cancellationToken).ConfigureAwait(false);
        await Inner.WriteAsync(offset, source, fua, cancellationToken).ConfigureAwait(false);
    }

    public override async ValueTask TrimAsync(long offset, long length, bool fua, CancellationToken cancellationToken)
    {
        await Task.Delay(_write, cancellationToken).ConfigureAwait(false);
        await Inner.TrimAsync(offset, length, fua, cancellationToken).ConfigureAwait(false);
    }

    public override async ValueTask WriteZeroesAsync(long offset, long length, ZeroFlags flags, CancellationToken cancellationToken)
    {
        await Task.Delay(_write, cancellationToken).ConfigureAwait(false);
        await Inner.WriteZeroesAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
    }

    protected override BlockDevice ForConnection(BlockDevice connectionInner) => new DelayDevice(connectionInner, _read, _write, ownsInner: true);
}
