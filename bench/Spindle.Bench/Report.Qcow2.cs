namespace Spindle.Bench;

/// <summary>
/// Issue 13's targets for the qcow2 rows: Spindle against <c>qemu-nbd -f qcow2 --cache=writeback</c> serving the same
/// qcow2 image, fully and half allocated. A target whose rows were not run is listed as not run.
/// </summary>
internal static partial class Report
{
    /// <summary>4k random read and write at QD32 on a qcow2 image: Spindle / qemu-nbd IOPS at least this.</summary>
    private const double Qcow2RandomRatio = 1.5;

    /// <summary>1M sequential read and write at QD8 on a qcow2 image: Spindle / qemu-nbd throughput at least this.</summary>
    private const double Qcow2SequentialRatio = 1.0;

    private static void Qcow2Targets(Action<string> line, Dictionary<(string Comparison, string Workload), (double Ratio, string Peer)> ratios)
    {
        line("## qcow2 targets");
        line("");
        line("Issue 13's targets, from this run's medians: Spindle / qemu-nbd serving the same qcow2 image (each its own copy).");
        line("");
        line("| target | measured | met |");
        line("|---|---|---|");
        foreach (var (comparison, image) in new[] { (ServerVariants.Qcow2, "fully allocated"), (ServerVariants.Qcow2Half, "half allocated") })
        {
            foreach (var (workload, goal, what) in new[]
            {
                ("randread-4k-qd32", Qcow2RandomRatio, "IOPS"),
                ("randwrite-4k-qd32", Qcow2RandomRatio, "IOPS"),
                ("read-1m-qd8", Qcow2SequentialRatio, "throughput"),
                ("write-1m-qd8", Qcow2SequentialRatio, "throughput"),
            })
            {
                var name = $"{image} qcow2, {workload}: at least {goal:F1}x qemu-nbd's {what}";
                line(ratios.TryGetValue((comparison, workload), out var r)
                    ? $"| {name} | {Ratio(r.Ratio)} | {(r.Ratio >= goal ? "yes" : "**no**")} |"
                    : $"| {name} | not run | - |");
            }
        }
    }
}
