using System.Globalization;
using System.Text.Json;

namespace Spindle.Bench;

/// <summary>What fio reported for one run.</summary>
internal sealed record FioResult(double Iops, double BytesPerSecond, double MeanMicroseconds, double P99Microseconds, long Operations);

internal static class Fio
{
    /// <summary>Runs fio and reads its JSON output (written to a file: fio's stdout also carries warnings).</summary>
    public static async Task<FioResult> RunAsync(IEnumerable<string> arguments, string work)
    {
        var output = Path.Combine(work, "fio-" + Guid.NewGuid().ToString("N")[..8] + ".json");
        var all = arguments.Concat(["--output-format=json", "--output=" + output]).ToList();
        var result = await Processes.RunAsync("fio", all, TimeSpan.FromMinutes(5));
        if (result.ExitCode != 0 || !File.Exists(output))
        {
            throw new InvalidOperationException($"fio {Processes.Describe(all)} failed ({result.ExitCode}): {result.Error}{result.Output}");
        }

        using var json = JsonDocument.Parse(await File.ReadAllTextAsync(output));
        File.Delete(output);
        var job = json.RootElement.GetProperty("jobs")[0];
        var read = job.GetProperty("read");
        var side = read.GetProperty("io_bytes").GetInt64() > 0 ? read : job.GetProperty("write");
        var completion = side.GetProperty("clat_ns");
        var p99 = completion.TryGetProperty("percentile", out var percentiles) && percentiles.TryGetProperty("99.000000", out var value) ? value.GetDouble() : double.NaN;
        return new FioResult(
            side.GetProperty("iops").GetDouble(),
            side.GetProperty("bw_bytes").GetDouble(),
            completion.GetProperty("mean").GetDouble() / 1000,
            p99 / 1000,
            side.GetProperty("total_ios").GetInt64());
    }

    /// <summary>The image read straight from the local file system (page cache), the bound for reads over NBD.</summary>
    public static Task<FioResult> RunLocalAsync(string image, string pattern, string blockSize, int depth, TimeSpan duration, string work) =>
        RunAsync(
        [
            "--name=local", "--filename=" + image, "--ioengine=psync", "--rw=" + pattern, "--bs=" + blockSize,
            "--iodepth=" + depth.ToString(CultureInfo.InvariantCulture), "--runtime=" + Seconds(duration), "--time_based", "--ramp_time=1",
        ],
            work);

    public static string Seconds(TimeSpan duration) => Math.Max(1, (int)duration.TotalSeconds).ToString(CultureInfo.InvariantCulture);
}

/// <summary>What a workload is judged by.</summary>
internal enum Metric
{
    Iops,
    Bandwidth,
    Latency,

    /// <summary>Peak resident memory, lower is better.</summary>
    Memory,
}

/// <summary>
/// A workload run against each server (restarted before each run, so its figures are its own): fio over NBD, nbdcopy
/// to null:, or connections held idle.
/// </summary>
internal interface IServerWorkload
{
    string Name { get; }

    string Title { get; }

    Metric Metric { get; }

    Task<RunResult> RunAsync(ServerUnderTest server, BenchOptions options, string work, int round);
}

/// <summary>Every server workload, in the order a round runs them.</summary>
internal static class ServerWorkloads
{
    public static IReadOnlyList<IServerWorkload> All => [.. FioWorkload.All, .. NbdcopyWorkload.All, IdleConnectionsWorkload.Instance];
}

/// <summary>
/// One fio workload over NBD (fio's nbd engine, one connection per job). A sequential workload with several jobs
/// gives each job its own slice of the image, so the jobs do not all read or write the same blocks.
/// </summary>
internal sealed record FioWorkload(string Name, string Title, string Pattern, string BlockSize, int Depth, int Jobs, Metric Metric) : IServerWorkload
{
    public static readonly IReadOnlyList<FioWorkload> All =
    [
        new("randread-4k-qd32", "4k random read, QD32", "randread", "4k", 32, 1, Metric.Iops),
        new("randwrite-4k-qd32", "4k random write, QD32", "randwrite", "4k", 32, 1, Metric.Iops),
        new("read-1m-qd8", "1M sequential read, QD8", "read", "1M", 8, 1, Metric.Bandwidth),
        new("write-1m-qd8", "1M sequential write, QD8", "write", "1M", 8, 1, Metric.Bandwidth),
        new("randread-4k-qd1", "4k random read, QD1 (latency)", "randread", "4k", 1, 1, Metric.Latency),
        new("randread-4k-4conn", "4k random read, 4 connections x QD32", "randread", "4k", 32, 4, Metric.Iops),
        new("randwrite-4k-4conn", "4k random write, 4 connections x QD32", "randwrite", "4k", 32, 4, Metric.Iops),
        new("read-1m-qd8-4conn", "1M sequential read, 4 connections x QD8", "read", "1M", 8, 4, Metric.Bandwidth),
        new("write-1m-qd8-4conn", "1M sequential write, 4 connections x QD8", "write", "1M", 8, 4, Metric.Bandwidth),
    ];

    public async Task<RunResult> RunAsync(ServerUnderTest server, BenchOptions options, string work, int round)
    {
        var arguments = new List<string>
        {
            "--name=" + Name, "--ioengine=nbd", "--uri=" + server.Uri, "--rw=" + Pattern, "--bs=" + BlockSize,
            "--iodepth=" + Depth.ToString(CultureInfo.InvariantCulture), "--numjobs=" + Jobs.ToString(CultureInfo.InvariantCulture),
            "--group_reporting", "--runtime=" + Fio.Seconds(options.Duration), "--time_based", "--ramp_time=1",
        };
        if (Jobs > 1 && !Pattern.StartsWith("rand", StringComparison.Ordinal))
        {
            // Job n covers [n * slice, (n + 1) * slice) and wraps around within it.
            var slice = (options.ImageBytes / Jobs).ToString(CultureInfo.InvariantCulture);
            arguments.AddRange(["--size=" + slice, "--offset_increment=" + slice]);
        }

        var cpuBefore = Processes.CpuSeconds(server.Pid);
        FioResult fio;
        long peak;
        await using (var sampler = new Processes.PeakSampler(server.Pid))
        {
            fio = await Fio.RunAsync(arguments, work);
            peak = sampler.PeakBytes;
        }

        // nbd-server's per-client children are reaped (and their CPU counted in the parent) shortly after fio leaves.
        await Task.Delay(300);
        var cpu = Processes.CpuSeconds(server.Pid) - cpuBefore;
        return new RunResult(Name, server.Name, round, fio.Iops, fio.BytesPerSecond, fio.MeanMicroseconds, fio.P99Microseconds, cpu, peak, fio.Operations) { Connections = Jobs };
    }
}
