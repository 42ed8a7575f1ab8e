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

// A thousand idle clients need a descriptor each here and in the server, which inherits this limit.
IdleConnectionsWorkload.EnsureFileLimit(IdleConnectionsWorkload.Count + 1024);
var work = Path.Combine(Path.GetTempPath(), "spindle-bench-" + DateTime.UtcNow.ToString("yyyyMMddHHmmss", CultureInfo.InvariantCulture));
Directory.CreateDirectory(work);
var image = Path.Combine(work, "image.raw");
var binary = SpindleBinary.Find(root);
Console.WriteLine($"bench: measuring {binary.Path} ({binary.Kind}, {binary.Version})");
var variants = ServerVariants.All(binary).Where(v => options.Servers is null || options.Servers.Contains(v.Name)).ToList();
Console.WriteLine($"bench: work directory {work}; about {options.Estimate(variants.Count).TotalMinutes:F0} minutes");
Console.WriteLine($"bench: writing a {options.ImageBytes >> 20} MiB image of random data");
await WriteRandomImageAsync(image, options.ImageBytes);
var images = await ServerVariants.PrepareImagesAsync(variants, image, work);
var spindleBinary = binary.Path;
var servers = variants.Select(v => v.Create()).ToList();

var port = 20000 + Random.Shared.Next(0, 20000);
var multiConn = new Dictionary<string, bool?>();
for (var i = 0; i < servers.Count; i++)
{
    var server = servers[i];
    await server.StartAsync(images[variants[i].Image.Key], port++, work);
    multiConn[server.Name] = await NbdcopyWorkload.CanMultiConnAsync(server);
    Console.WriteLine($"bench: {server.Name} on {server.Uri} (pid {server.Pid}), multi-conn {(multiConn[server.Name] is { } flag ? (flag ? "yes" : "no") : "unknown")}");
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

    var workloads = ServerWorkloads.All.Where(w => options.Workloads is null || options.Workloads.Contains(w.Name)).ToList();
    var variantOf = servers.Select((s, i) => (s, variants[i])).ToDictionary(p => p.s, p => p.Item2);
    for (var round = 0; round < options.Rounds; round++)
    {
        // The order rotates each round, so no server always runs first (cold) or last.
        var order = servers.Skip(round % servers.Count).Concat(servers.Take(round % servers.Count)).ToList();
        foreach (var workload in workloads)
        {
            foreach (var server in order.Where(s => variantOf[s].Runs(workload.Name)))
            {
                // A fresh process per run: no server carries one workload's memory or state into the next.
                await server.RestartAsync();
                var result = await workload.RunAsync(server, options, work, round);
                results.Add(result);
                Console.WriteLine($"bench: round {round + 1}/{options.Rounds} {workload.Name,-20} {server.Name,-10} {result.Summary}");
            }
        }

        // The copy tools, both reading the export Spindle serves: this compares clients, not servers.
        if (servers.FirstOrDefault(s => s.Name == ServerVariants.Spindle) is { } source)
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

var report = Report.Build(new ReportInput(options, binary, servers, ServerVariants.Comparisons, results, limits, multiConn));
var jsonPath = Path.Combine(root, "bench", "results", $"run-{DateTime.UtcNow:yyyyMMdd-HHmmss}.json");
Directory.CreateDirectory(Path.GetDirectoryName(jsonPath)!);
await File.WriteAllTextAsync(jsonPath, JsonSerializer.Serialize(new { options = options.ToString(), spindle = binary, limits, multiConn, results }, new JsonSerializerOptions { WriteIndented = true, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals }));
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
