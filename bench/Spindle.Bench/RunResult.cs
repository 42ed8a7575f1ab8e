using System.Globalization;

namespace Spindle.Bench;

/// <summary>
/// One measurement: a workload against a server in one round, with the server's resources. The positional figures
/// are fio's (NaN or 0 where a workload has none); the init-only ones belong to the workloads that have them.
/// </summary>
internal sealed record RunResult(string Workload, string Server, int Round, double Iops, double BytesPerSecond, double MeanMicroseconds, double P99Microseconds, double CpuSeconds, long PeakRssBytes, long Operations)
{
    /// <summary>Connections used: fio's jobs; for nbdcopy the most seen at once on the server's side; for idle ones those that reached transmission.</summary>
    public int Connections { get; init; }

    /// <summary>nbdcopy: the median copy's seconds; idle connections: seconds to open them all.</summary>
    public double ElapsedSeconds { get; init; } = double.NaN;

    /// <summary>Idle connections: the server tree's resident set before the first connection.</summary>
    public long BaselineRssBytes { get; init; }

    /// <summary>Idle connections: the server tree's proportional set size while the connections are held.</summary>
    public long ProportionalBytes { get; init; }

    /// <summary>Idle connections: established TCP connections on the server's port while they are held.</summary>
    public int ServerConnections { get; init; }

    public double CpuMicrosecondsPerOperation => Operations == 0 ? double.NaN : CpuSeconds * 1e6 / Operations;

    /// <summary>One console line, by the kind of workload.</summary>
    public string Summary => Workload.StartsWith("idle-", StringComparison.Ordinal)
        ? string.Create(CultureInfo.InvariantCulture,
            $"{Connections,5} connections ({ServerConnections} on the server's port) in {ElapsedSeconds:F1} s, RSS {BaselineRssBytes >> 20} -> peak {PeakRssBytes >> 20} MiB, PSS {ProportionalBytes >> 20} MiB")
        : Workload.StartsWith("nbdcopy-", StringComparison.Ordinal)
        ? string.Create(CultureInfo.InvariantCulture,
            $"{BytesPerSecond / (1 << 20),9:F1} MiB/s in {ElapsedSeconds:F2} s, {Connections} connection(s), cpu {CpuSeconds,6:F2} s per copy, peak {PeakRssBytes >> 20,5} MiB")
        : string.Create(CultureInfo.InvariantCulture,
            $"{Iops,10:F0} IOPS {BytesPerSecond / (1 << 20),9:F1} MiB/s mean {MeanMicroseconds,8:F1} us p99 {P99Microseconds,8:F1} us cpu {CpuSeconds,6:F2} s peak {PeakRssBytes >> 20,5} MiB");
}
