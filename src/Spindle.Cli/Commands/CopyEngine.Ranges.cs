using System.Runtime.CompilerServices;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>Copying only some ranges of the source (<see cref="CopySettings.Ranges"/>: an incremental backup).</summary>
internal sealed partial class CopyEngine
{
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
    /// says which bytes are zeroes (written as WRITE_ZEROES or a punched hole, not read).
    /// </summary>
    private async IAsyncEnumerable<SourceRun> SelectedRunsAsync(long size, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        var extents = new ExtentList(ExtentBatch);
        foreach (var range in AlignedRanges())
        {
            await foreach (var run in RangeRunsAsync(range.Offset, Math.Min(range.End, size), extents, cancellationToken).ConfigureAwait(false))
            {
                yield return run;
            }
        }
    }
}
