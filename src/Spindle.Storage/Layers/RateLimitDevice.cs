using System.Diagnostics;

namespace Spindle.Storage.Layers;

/// <summary>
/// Holds an export's data rate to a limit (issue 14: <c>--rate BYTES/s</c>, <c>--rate-burst BYTES</c>; nbdkit's rate
/// filter), for every connection together. A token bucket: it fills at the rate up to the burst, and each READ or
/// WRITE takes its length from it, waiting for the bucket to refill when it runs into debt. Over any interval T the
/// bytes moved are at most burst + rate × T (plus the one request that ran the bucket into debt). Other commands
/// move no data and pass freely.
/// </summary>
public sealed class RateLimitDevice : LayerDevice
{
    private readonly TokenBucket _bucket;

    /// <param name="inner">The device below.</param>
    /// <param name="bytesPerSecond">The limit.</param>
    /// <param name="burst">How many bytes may pass at once after a quiet spell; null: one second's worth.</param>
    /// <param name="ownsInner">Dispose the inner device with this one.</param>
    public RateLimitDevice(BlockDevice inner, long bytesPerSecond, long? burst, bool ownsInner)
        : this(inner, new TokenBucket(bytesPerSecond, burst ?? bytesPerSecond), ownsInner)
    {
    }

    private RateLimitDevice(BlockDevice inner, TokenBucket bucket, bool ownsInner)
        : base(inner, ownsInner) => _bucket = bucket;

    public override string Description => $"{Inner.Description}, limited to {_bucket.Rate} bytes/s";

    public override async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        await _bucket.TakeAsync(destination.Length, cancellationToken).ConfigureAwait(false);
        await Inner.ReadAsync(offset, destination, cancellationToken).ConfigureAwait(false);
    }

    public override async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, bool fua, CancellationToken cancellationToken)
    {
        await _bucket.TakeAsync(source.Length, cancellationToken).ConfigureAwait(false);
        await Inner.WriteAsync(offset, source, fua, cancellationToken).ConfigureAwait(false);
    }

    protected override BlockDevice ForConnection(BlockDevice connectionInner) => new RateLimitDevice(connectionInner, _bucket, ownsInner: true);

    /// <summary>The bucket, shared by every connection's view of the export.</summary>
    private sealed class TokenBucket
    {
        private readonly Lock _lock = new();
        private readonly long _burst;
        private double _tokens;
        private long _stamp;

        public TokenBucket(long rate, long burst)
        {
            ArgumentOutOfRangeException.ThrowIfLessThan(rate, 1);
            ArgumentOutOfRangeException.ThrowIfLessThan(burst, 1);
            Rate = rate;
            _burst = burst;
            _tokens = burst;
            _stamp = Stopwatch.GetTimestamp();
        }

        public long Rate { get; }

        /// <summary>Takes <paramref name="bytes"/>, then waits until the debt this leaves (if any) is paid off.</summary>
        public Task TakeAsync(long bytes, CancellationToken cancellationToken)
        {
            double debt;
            lock (_lock)
            {
                var now = Stopwatch.GetTimestamp();
                _tokens = Math.Min(_burst, _tokens + (Stopwatch.GetElapsedTime(_stamp, now).TotalSeconds * Rate));
                _stamp = now;
                _tokens -= bytes;
                debt = -_tokens;
            }

            return debt <= 0 ? Task.CompletedTask : Task.Delay(TimeSpan.FromSeconds(debt / Rate), cancellationToken);
        }
    }
}
