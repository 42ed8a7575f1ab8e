using System.Runtime.CompilerServices;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>Copying only some ranges of the source (<see cref="CopySettings.Ranges"/>: an incremental backup).</summary>
internal sealed partial class CopyEngine
{
    /// <summary>
    /// Bytes of allocation asked for at once when copying ranges: 64 MiB, so that one answer (at most
    /// <see cref="ExtentBatch"/> extents) serves the small ranges near each other.
    /// </summary>
    private const long AllocationLookahead = 64L << 20;

    private IReadOnlyList<ByteRange>? _aligned;

    /// <summary>What every request must be a multiple of: the larger of the two ends' minimum block sizes.</summary>
    public int Alignment => (int)Math.Max((source.BlockSizes ?? BlockSizeConstraints.Default).Minimum, (destination.BlockSizes ?? BlockSizeConstraints.Default).Minimum);

    /// <summary>Bytes the copy deals with: the whole source, or the ranges once rounded out to <see cref="Alignment"/>.</summary>
    public long TotalBytes => settings.Ranges is null ? source.Size : AlignedRanges().Sum(range => range.Length);

    /// <summary>
    /// <see cref="CopySettings.Ranges"/> rounded out to <see cref="Alignment"/> (a dirty bitmap's granularity need
    /// not be a multiple of what the ends accept; copying a few clean bytes as well is harmless), clipped to the
    /// source and merged where they now touch or overlap, so that neighbouring ranges share full-size requests.
    /// </summary>
    internal IReadOnlyList<ByteRange> AlignedRanges()
    {
        if (_aligned is not null)
        {
            return _aligned;
        }

        var alignment = Alignment;
        var size = source.Size;
        var merged = new List<ByteRange>();
        foreach (var range in settings.Ranges ?? [])
        {
            var start = Math.Min(range.Offset / alignment * alignment, size);
            var end = Math.Min(RoundUp(range.End, alignment), size);
            if (end <= start)
            {
                continue;
            }

            if (merged.Count > 0 && start < merged[^1].Offset)
            {
                throw new ArgumentException($"copy ranges out of order: {range.Offset} after {merged[^1].Offset}");
            }

            if (merged.Count > 0 && start <= merged[^1].End)
            {
                merged[^1] = merged[^1] with { Length = Math.Max(merged[^1].End, end) - merged[^1].Offset };
            }
            else
            {
                merged.Add(new ByteRange(start, end - start));
            }
        }

        _aligned = merged;
        return merged;
    }

    /// <summary>
    /// The runs of each selected range in turn, with gaps between them: inside a range the source's allocation still
    /// says which bytes are zeroes (written as WRITE_ZEROES or a punched hole, not read). The allocation is asked for
    /// at least <see cref="AllocationLookahead"/> bytes at a time and the answer kept for the ranges that follow, so a
    /// bitmap of many small ranges costs a few BLOCK_STATUS round trips, not one per range.
    /// </summary>
    private async IAsyncEnumerable<SourceRun> SelectedRunsAsync(long size, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        var ranges = AlignedRanges();
        if (!settings.UseExtents || (source.Features & BlockDeviceFeatures.Extents) == 0)
        {
            foreach (var range in ranges)
            {
                yield return new SourceRun(range.Offset, Math.Min(range.End, size) - range.Offset, false);
            }

            yield break;
        }

        var extents = new ExtentList(ExtentBatch);
        var window = new List<SourceRun>(ExtentBatch);
        var windowEnd = 0L;
        var index = 0;
        foreach (var range in ranges)
        {
            // Bounded: each pass yields at least one byte, or asks the source, which describes at least one byte or
            // none (then the rest of the range is data).
            var position = range.Offset;
            var end = Math.Min(range.End, size);
            while (position < end)
            {
                if (position >= windowEnd)
                {
                    var askEnd = Math.Max(end, Math.Min(size, position + AllocationLookahead));
                    extents.Clear(ExtentBatch);
                    await source.GetExtentsAsync(position, askEnd - position, extents, cancellationToken).ConfigureAwait(false);
                    window.Clear();
                    index = 0;
                    windowEnd = position;
                    for (var i = 0; i < extents.Count && windowEnd < askEnd; i++)
                    {
                        var length = Math.Min(extents[i].Length, askEnd - windowEnd);
                        window.Add(new SourceRun(windowEnd, length, (extents[i].Flags & AllocationFlags.Zero) != 0));
                        windowEnd += length;
                    }

                    if (window.Count == 0)
                    {
                        // Nothing reported: the rest of the range is data (always safe).
                        yield return new SourceRun(position, end - position, false);
                        break;
                    }
                }

                while (window[index].Offset + window[index].Length <= position)
                {
                    index++;
                }

                var run = window[index];
                var runEnd = Math.Min(run.Offset + run.Length, end);
                yield return new SourceRun(position, runEnd - position, run.Zero);
                position = runEnd;
            }
        }
    }
}

/// <summary>
/// Dirty ranges collected in order, merged where they touch. A bitmap can be fragmented without limit (a hostile or
/// broken server may say every other byte is dirty), so the number of ranges is bounded: past
/// <see cref="MaxRanges"/>, ranges separated by small gaps are merged, the tolerated gap doubling until at most half
/// remain. That only copies some clean bytes as well, which is harmless: they are the same on both ends.
/// </summary>
internal sealed class DirtyRangeSet(int maxRanges = DirtyRangeSet.DefaultMaxRanges)
{
    /// <summary>4 Mi ranges (64 MiB): a 64 KiB-granular bitmap with every other granule dirty over 512 GiB.</summary>
    public const int DefaultMaxRanges = 1 << 22;

    private readonly List<ByteRange> _ranges = [];

    /// <summary>The most ranges kept; at least 2.</summary>
    public int MaxRanges { get; } = Math.Max(2, maxRanges);

    /// <summary>Gaps up to this many bytes are merged over (0 until the first coarsening).</summary>
    public long MergeGap { get; private set; }

    /// <summary>The bytes added (dirty), not counting gaps merged over.</summary>
    public long DirtyBytes { get; private set; }

    public IReadOnlyList<ByteRange> Ranges => _ranges;

    /// <summary>Adds a dirty range at or after the end of the last one.</summary>
    public void Add(long offset, long length)
    {
        if (length <= 0)
        {
            return;
        }

        if (_ranges.Count > 0 && offset < _ranges[^1].End)
        {
            throw new ArgumentException($"dirty ranges out of order: {offset} before {_ranges[^1].End}");
        }

        DirtyBytes += length;
        if (_ranges.Count > 0 && offset - _ranges[^1].End <= MergeGap)
        {
            _ranges[^1] = _ranges[^1] with { Length = offset + length - _ranges[^1].Offset };
            return;
        }

        _ranges.Add(new ByteRange(offset, length));
        if (_ranges.Count >= MaxRanges)
        {
            Coarsen();
        }
    }

    /// <summary>Doubles the merge gap and merges over it until at most half the limit remain (at most 63 passes).</summary>
    private void Coarsen()
    {
        while (_ranges.Count > MaxRanges / 2)
        {
            MergeGap = MergeGap == 0 ? 4096 : MergeGap > long.MaxValue / 2 ? long.MaxValue : MergeGap * 2;
            var kept = 0;
            for (var i = 1; i < _ranges.Count; i++)
            {
                if (_ranges[i].Offset - _ranges[kept].End <= MergeGap)
                {
                    _ranges[kept] = _ranges[kept] with { Length = _ranges[i].End - _ranges[kept].Offset };
                }
                else
                {
                    _ranges[++kept] = _ranges[i];
                }
            }

            _ranges.RemoveRange(kept + 1, _ranges.Count - kept - 1);
        }
    }
}
