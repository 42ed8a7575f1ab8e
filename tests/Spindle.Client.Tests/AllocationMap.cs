using System.Text.Json;

namespace Spindle.Client.Tests;

/// <summary>A run of an allocation map: HOLE and ZERO as base:allocation has them.</summary>
internal readonly record struct AllocationRun(long Offset, long Length, bool Hole, bool Zero)
{
    public long End => Offset + Length;
}

/// <summary>Allocation maps from qemu-img map and spindle info --map, normalised so they can be compared.</summary>
internal static class AllocationMap
{
    /// <summary>
    /// qemu-img map --output=json: "data" false is NBD_STATE_HOLE and "zero" true is NBD_STATE_ZERO (qemu's NBD server
    /// derives base:allocation from the same block status bits).
    /// </summary>
    public static List<AllocationRun> FromQemuImg(string json)
    {
        using var document = JsonDocument.Parse(json);
        var runs = document.RootElement.EnumerateArray().Select(entry => new AllocationRun(
            entry.GetProperty("start").GetInt64(),
            entry.GetProperty("length").GetInt64(),
            !entry.GetProperty("data").GetBoolean(),
            entry.GetProperty("zero").GetBoolean()));
        return Merge(runs);
    }

    /// <summary>spindle info --map --json: type bit 0 is HOLE, bit 1 is ZERO.</summary>
    public static List<AllocationRun> FromSpindle(string json)
    {
        using var document = JsonDocument.Parse(json);
        var runs = document.RootElement.EnumerateArray().Select(entry =>
        {
            var type = entry.GetProperty("type").GetUInt32();
            return new AllocationRun(entry.GetProperty("offset").GetInt64(), entry.GetProperty("length").GetInt64(), (type & 1) != 0, (type & 2) != 0);
        });
        return Merge(runs);
    }

    /// <summary>Joins neighbours with the same status; checks the runs are consecutive from 0.</summary>
    public static List<AllocationRun> Merge(IEnumerable<AllocationRun> runs)
    {
        var merged = new List<AllocationRun>();
        foreach (var run in runs)
        {
            if (merged.Count > 0 && merged[^1].End != run.Offset)
            {
                throw new InvalidOperationException($"runs are not consecutive: {merged[^1]} then {run}");
            }

            if (merged.Count > 0 && merged[^1].Hole == run.Hole && merged[^1].Zero == run.Zero)
            {
                merged[^1] = merged[^1] with { Length = merged[^1].Length + run.Length };
            }
            else
            {
                merged.Add(run);
            }
        }

        return merged;
    }
}
