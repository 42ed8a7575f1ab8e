using System.Globalization;

namespace Spindle.Bench;

/// <summary>One table per kind of server workload: fio's figures, nbdcopy's, the idle connections'.</summary>
internal static partial class Report
{
    private static void FioTable(Action<string> line, IReadOnlyList<string> members, List<RunResult> runs)
    {
        line("| server | IOPS | MiB/s | mean latency (us) | p99 latency (us) | server CPU per op (us) | peak RSS (MiB) |");
        line("|---|---:|---:|---:|---:|---:|---:|");
        foreach (var (server, mine) in ByServer(members, runs))
        {
            line($"| {server} | {Cell(mine, r => r.Iops, "F0")} | {Cell(mine, r => r.BytesPerSecond / (1 << 20), "F1")} | {Cell(mine, r => r.MeanMicroseconds, "F1")} | {Cell(mine, r => r.P99Microseconds, "F0")} | {Cell(mine, r => r.CpuMicrosecondsPerOperation, "F1")} | {Median(mine.Select(r => (double)(r.PeakRssBytes >> 20))):F0} |");
        }
    }

    private static void NbdcopyTable(Action<string> line, IReadOnlyList<string> members, List<RunResult> runs, IReadOnlyDictionary<string, bool?> multiConn)
    {
        line("| server | MiB/s | seconds per copy | connections used | multi-conn advertised | server CPU per copy (s) | peak RSS (MiB) |");
        line("|---|---:|---:|---:|---|---:|---:|");
        foreach (var (server, mine) in ByServer(members, runs))
        {
            var advertised = multiConn.TryGetValue(server, out var flag) && flag is { } known ? (known ? "yes" : "no") : "?";
            line($"| {server} | {Cell(mine, r => r.BytesPerSecond / (1 << 20), "F0")} | {Cell(mine, r => r.ElapsedSeconds, "F2")} | {Cell(mine, r => r.Connections, "F0")} | {advertised} | {Cell(mine, r => r.CpuSeconds, "F2")} | {Median(mine.Select(r => (double)(r.PeakRssBytes >> 20))):F0} |");
        }
    }

    private static void IdleTable(Action<string> line, IReadOnlyList<string> members, List<RunResult> runs)
    {
        line("| server | connections held (server's port) | RSS before (MiB) | peak RSS (MiB) | per connection (KiB) | PSS held (MiB) | seconds to open | server CPU (s) |");
        line("|---|---:|---:|---:|---:|---:|---:|---:|");
        foreach (var (server, mine) in ByServer(members, runs))
        {
            var perConnection = Cell(mine, r => r.Connections == 0 ? double.NaN : (r.PeakRssBytes - r.BaselineRssBytes) / 1024.0 / r.Connections, "F0");
            line($"| {server} | {Cell(mine, r => r.Connections, "F0")} ({Cell(mine, r => r.ServerConnections, "F0")}) | {Cell(mine, r => r.BaselineRssBytes / (double)(1 << 20), "F0")} | {Cell(mine, r => r.PeakRssBytes / (double)(1 << 20), "F0")} | {perConnection} | {Cell(mine, r => r.ProportionalBytes / (double)(1 << 20), "F0")} | {Cell(mine, r => r.ElapsedSeconds, "F1")} | {Cell(mine, r => r.CpuSeconds, "F2")} |");
        }
    }

    /// <summary>The comparison's members that ran, in the comparison's order (subject first), with their runs.</summary>
    private static IEnumerable<(string Server, List<RunResult> Runs)> ByServer(IReadOnlyList<string> members, List<RunResult> runs) =>
        members.Select(m => (m, runs.Where(r => r.Server == m).ToList())).Where(p => p.Item2.Count > 0);

    private static string Ratio(double value) => value.ToString("F2", CultureInfo.InvariantCulture) + "x";
}
