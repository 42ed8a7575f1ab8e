using System.Globalization;
using System.Text.Json;
using Spindle.Bench;

// The side-by-side benchmark (bench/run wraps this). See docs/performance.md for what it measures and why.
var options = BenchOptions.Parse(args);
if (options is null)
{
    return 2;
}

var root = options.RepositoryRoot;
var work = Path.Combine(Path.GetTempPath(), "spindle-bench-" + DateTime.UtcNow.ToString("yyyyMMddHHmmss", CultureInfo.InvariantCulture));
Directory.CreateDirectory(work);
var image = Path.Combine(work, "image.raw");
Console.WriteLine($"bench: work directory {work}");
Console.WriteLine($"bench: writing a {options.ImageBytes >> 20} MiB image of random data");
await WriteRandomImageAsync(image, options.ImageBytes);

var spindleBinary = File.Exists(Path.Combine(root, "artifacts/spindle/spindle")) ? Path.Combine(root, "artifacts/spindle/spindle") : Path.Combine(root, "src/Spindle.Cli/bin/Release/net10.0/spindle");
var servers = new List<ServerUnderTest>
{
    new SpindleServer(spindleBinary),
    new NbdkitServer(),
    new NbdServerServer(),
    new QemuNbdServer(),
}.Where(s => options.Servers is null || options.Servers.Contains(s.Name)).ToList();

var port = 20000 + Random.Shared.Next(0, 20000);
foreach (var server in servers)
{
    await server.StartAsync(image, port++, work);
    Console.WriteLine($"bench: {server.Name} on {server.Uri} (pid {server.Pid})");
}

var results = new List<RunResult>();
var limits = new Dictionary<string, double>();
try
{
    Console.WriteLine("bench: limits (loopback stream, round trip, local reads)");
    limits["tcp_stream_bytes_per_second"] = Median(Enumerable.Range(0, 3).Select(_ => Limits.TcpStreamBytesPerSecond(TimeSpan.FromSeconds(Math.Min(5, options.Duration.TotalSeconds)))).ToList());
    var roundTrips = Enumerable.Range(0, 3).Select(_ => Limits.RoundTripMicroseconds(20000)).ToList();
    limits["round_trip_mean_us"] = Median(roundTrips.Select(r => r.Mean).ToList());
    limits["round_trip_p99_us"] = Median(roundTrips.Select(r => r.P99).ToList());
    var localRandom = await Fio.RunLocalAsync(image, "randread", "4k", 1, options.Duration, work);
    limits["local_randread_4k_qd1_iops"] = localRandom.Iops;
    limits["local_randread_4k_qd1_mean_us"] = localRandom.MeanMicroseconds;
    var localSequential = await Fio.RunLocalAsync(image, "read", "1M", 8, options.Duration, work);
    limits["local_read_1m_bytes_per_second"] = localSequential.BytesPerSecond;

    var workloads = Workload.All.Where(w => options.Workloads is null || options.Workloads.Contains(w.Name)).ToList();
    for (var round = 0; round < options.Rounds; round++)
    {
        // The order rotates each round, so no server always runs first (cold) or last.
        var order = servers.Skip(round % servers.Count).Concat(servers.Take(round % servers.Count)).ToList();
        foreach (var workload in workloads)
        {
            foreach (var server in order)
            {
                // A fresh process per run: no server carries one workload's memory or state into the next.
                await server.RestartAsync();
                var result = await workload.RunAsync(server, options, work, round, root);
                results.Add(result);
                Console.WriteLine($"bench: round {round + 1}/{options.Rounds} {workload.Name,-20} {server.Name,-10} {result.Summary}");
            }
        }

        // The copy tools, both reading the export Spindle serves: this compares clients, not servers.
        if (servers.FirstOrDefault(s => s.Name == "spindle") is { } source)
        {
            foreach (var destination in CopyWorkload.Destinations.Where(d => options.Workloads is null || options.Workloads.Contains($"copy-to-{d}")))
            {
                var tools = round % 2 == 0 ? CopyWorkload.Tools : CopyWorkload.Tools.Reverse().ToArray();
                foreach (var tool in tools)
                {
                    await source.EnsureRunningAsync();
                    var result = await CopyWorkload.RunAsync(tool, destination, source.Uri, options.ImageBytes, spindleBinary, work, round);
                    results.Add(result);
                    Console.WriteLine($"bench: round {round + 1}/{options.Rounds} {result.Workload,-20} {tool,-10} {result.BytesPerSecond / (1 << 20),9:F1} MiB/s in {result.MeanMicroseconds / 1e6:F2} s, cpu {result.CpuSeconds:F2} s");
                }
            }
        }
    }
}
catch
{
    Directory.Delete(work, recursive: true);
    throw;
}
finally
{
    foreach (var server in servers)
    {
        await server.DisposeAsync();
    }
}

var report = Report.Build(options, servers, results, limits);
var jsonPath = Path.Combine(root, "bench", "results", $"run-{DateTime.UtcNow:yyyyMMdd-HHmmss}.json");
Directory.CreateDirectory(Path.GetDirectoryName(jsonPath)!);
await File.WriteAllTextAsync(jsonPath, JsonSerializer.Serialize(new { options = options.ToString(), limits, results }, new JsonSerializerOptions { WriteIndented = true, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals }));
if (options.Output is not null)
{
    await File.WriteAllTextAsync(options.Output, report);
    Console.WriteLine($"bench: report written to {options.Output}, raw results to {jsonPath}");
}
else
{
    Console.WriteLine(report);
}

Directory.Delete(work, recursive: true);
return 0;

static async Task WriteRandomImageAsync(string path, long bytes)
{
    var buffer = new byte[1 << 20];
    await using var stream = new FileStream(path, FileMode.CreateNew, FileAccess.Write);
    for (var written = 0L; written < bytes; written += buffer.Length)
    {
        Random.Shared.NextBytes(buffer);
        await stream.WriteAsync(buffer);
    }
}

static double Median(IReadOnlyList<double> values)
{
    var sorted = values.Order().ToList();
    return sorted.Count == 0 ? double.NaN : sorted.Count % 2 == 1 ? sorted[sorted.Count / 2] : (sorted[(sorted.Count / 2) - 1] + sorted[sorted.Count / 2]) / 2;
}

namespace Spindle.Bench
{
    /// <summary>Command-line options of the benchmark.</summary>
    internal sealed record BenchOptions(string RepositoryRoot, int Rounds, TimeSpan Duration, long ImageBytes, string? Output, HashSet<string>? Servers, HashSet<string>? Workloads)
    {
        public static BenchOptions? Parse(string[] args)
        {
            var root = FindRoot();
            var rounds = 3;
            var duration = TimeSpan.FromSeconds(10);
            var image = 1L << 30;
            string? output = Path.Combine(root, "docs", "performance.md");
            HashSet<string>? servers = null;
            HashSet<string>? workloads = null;
            for (var i = 0; i < args.Length; i++)
            {
                switch (args[i])
                {
                    case "--rounds":
                        rounds = Math.Max(1, int.Parse(args[++i], CultureInfo.InvariantCulture));
                        break;
                    case "--seconds":
                        duration = TimeSpan.FromSeconds(double.Parse(args[++i], CultureInfo.InvariantCulture));
                        break;
                    case "--image-mib":
                        image = long.Parse(args[++i], CultureInfo.InvariantCulture) << 20;
                        break;
                    case "--quick":
                        rounds = 1;
                        duration = TimeSpan.FromSeconds(3);
                        image = 256L << 20;
                        break;
                    case "--servers":
                        servers = [.. args[++i].Split(',')];
                        break;
                    case "--workloads":
                        workloads = [.. args[++i].Split(',')];
                        break;
                    case "--stdout":
                        output = null;
                        break;
                    case "--output":
                        output = Path.GetFullPath(args[++i]);
                        break;
                    default:
                        Console.Error.WriteLine($"""
                            unknown argument '{args[i]}'
                            usage: bench/run [--rounds N (3)] [--seconds S (10)] [--image-mib M (1024)] [--quick]
                                             [--servers spindle,nbdkit,nbd-server,qemu-nbd] [--workloads {string.Join(',', Workload.All.Select(w => w.Name).Concat(CopyWorkload.Names))}]
                                             [--output FILE (docs/performance.md) | --stdout]
                            """);
                        return null;
                }
            }

            return new BenchOptions(root, rounds, duration, image, output, servers, workloads);
        }

        public override string ToString() => $"rounds={Rounds} seconds={Duration.TotalSeconds} image={ImageBytes >> 20}MiB";

        private static string FindRoot()
        {
            for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
            {
                if (File.Exists(Path.Combine(directory.FullName, "Spindle.slnx")))
                {
                    return directory.FullName;
                }
            }

            return Directory.GetCurrentDirectory();
        }
    }

    /// <summary>One measurement: a workload against a server in one round, with the server's resources.</summary>
    internal sealed record RunResult(string Workload, string Server, int Round, double Iops, double BytesPerSecond, double MeanMicroseconds, double P99Microseconds, double CpuSeconds, long PeakRssBytes, long Operations)
    {
        public double CpuMicrosecondsPerOperation => Operations == 0 ? double.NaN : CpuSeconds * 1e6 / Operations;

        public string Summary => string.Create(CultureInfo.InvariantCulture,
            $"{Iops,10:F0} IOPS {BytesPerSecond / (1 << 20),9:F1} MiB/s mean {MeanMicroseconds,8:F1} us p99 {P99Microseconds,8:F1} us cpu {CpuSeconds,6:F2} s peak {PeakRssBytes >> 20,5} MiB");
    }
}
