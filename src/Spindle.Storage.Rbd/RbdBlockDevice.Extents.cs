using System.Runtime.InteropServices;
using Spindle.Protocol;
using Spindle.Storage.Rbd.Native;

namespace Spindle.Storage.Rbd;

/// <summary>BLOCK_STATUS: allocation from rbd_diff_iterate2, diffing the image (or snapshot) against nothing.</summary>
public sealed partial class RbdBlockDevice
{
    /// <summary>
    /// How far one BLOCK_STATUS looks with fast-diff: the object map answers without touching the OSDs, so this
    /// only bounds the work of one call. The reply may stop early (the client asks again from there).
    /// </summary>
    private const long FastDiffProbeLength = 64L << 30;

    /// <summary>Without fast-diff, librbd asks the OSD about every object in the range: keep each call short.</summary>
    private const long SlowDiffProbeLength = 256L << 20;

    /// <summary>Allocated regions collected per call before stopping early.</summary>
    private const int MaxRegions = 4096;

    /// <summary>Returned by the callback to stop the iteration once enough regions are known.</summary>
    private const int StopIteration = -9000;

    /// <summary>rbd_diff_iterate2 blocks its thread: at most this many run at once, on the thread pool.</summary>
    private static readonly SemaphoreSlim DiffGate = new(Math.Max(2, Environment.ProcessorCount));

    private readonly bool _fastDiff;

    public override async ValueTask GetExtentsAsync(long offset, long length, ExtentList extents, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(extents);
        var probe = Math.Min(length, _fastDiff ? FastDiffProbeLength : SlowDiffProbeLength);
        EnterRequest();
        try
        {
            await DiffGate.WaitAsync(cancellationToken).ConfigureAwait(false);
            DiffResult diff;
            try
            {
                diff = await Task.Run(() => Diff(offset, probe), CancellationToken.None).ConfigureAwait(false);
            }
            finally
            {
                DiffGate.Release();
            }

            if (diff.Result < 0)
            {
                throw Failure("block status", offset, -diff.Result);
            }

            Describe(offset, diff, extents);
        }
        finally
        {
            FinishRequest();
        }
    }

    /// <summary>Turns allocated regions into extents: gaps between them read as zeroes and are holes.</summary>
    private static void Describe(long offset, DiffResult diff, ExtentList extents)
    {
        var regions = diff.Regions;

        // librbd reports in image order for the usual layout; with fancy striping it need not, so sort.
        regions.Sort(static (a, b) => a.Offset.CompareTo(b.Offset));
        var position = offset;
        foreach (var (regionOffset, regionLength) in regions)
        {
            var start = Math.Max(regionOffset, position);
            var end = Math.Min(regionOffset + regionLength, diff.End);
            if (end <= start)
            {
                continue;
            }

            if (start > position && !extents.Add(start - position, AllocationFlags.Hole | AllocationFlags.Zero))
            {
                return;
            }

            if (!extents.Add(end - start, AllocationFlags.Data))
            {
                return;
            }

            position = end;
        }

        if (position < diff.End)
        {
            extents.Add(diff.End - position, AllocationFlags.Hole | AllocationFlags.Zero);
        }
        else if (extents.Count == 0)
        {
            // Nothing in range at all (cannot happen with a non-empty probe, but BLOCK_STATUS needs one extent).
            extents.Add(diff.End - offset, AllocationFlags.Data);
        }
    }

    private unsafe DiffResult Diff(long offset, long length)
    {
        var collector = new DiffCollector();
        var handle = GCHandle.Alloc(collector);
        try
        {
            // include_parent: a clone's unwritten parts read through to its parent, so they are data. whole_object
            // with fast-diff answers from the object map (a 4 MiB granularity); without it librbd lists each object.
            var result = LibRbd.DiffIterate2(_image, null, (ulong)offset, (ulong)length, includeParent: 1, wholeObject: _fastDiff ? (byte)1 : (byte)0,
                &OnDiffRegion, GCHandle.ToIntPtr(handle));
            if (result == StopIteration)
            {
                // Stopped early: only up to the end of the last region reported is known, and only if regions came
                // in order (they do unless the image uses fancy striping). Otherwise an unreported region could hide
                // anywhere, and "data" is the answer that is always safe.
                return collector.Ordered
                    ? new DiffResult(0, collector.Regions, Math.Min(collector.KnownEnd, offset + length))
                    : new DiffResult(0, [(offset, length)], offset + length);
            }

            return new DiffResult(result, collector.Regions, offset + length);
        }
        finally
        {
            handle.Free();
        }
    }

    [UnmanagedCallersOnly]
    private static int OnDiffRegion(ulong offset, nuint length, int exists, nint argument)
    {
        var collector = (DiffCollector)GCHandle.FromIntPtr(argument).Target!;
        if (exists == 0)
        {
            // Known to read as zeroes: a hole, which is what the gaps between regions already say.
            return 0;
        }

        if ((long)offset < collector.KnownEnd)
        {
            collector.Ordered = false;
        }

        collector.Regions.Add(((long)offset, (long)length));
        collector.KnownEnd = Math.Max(collector.KnownEnd, (long)offset + (long)length);
        return collector.Regions.Count >= MaxRegions ? StopIteration : 0;
    }

    private sealed class DiffCollector
    {
        public List<(long Offset, long Length)> Regions { get; } = [];

        public long KnownEnd { get; set; }

        public bool Ordered { get; set; } = true;
    }

    private readonly record struct DiffResult(int Result, List<(long Offset, long Length)> Regions, long End);
}
