using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Spindle.Bench;

/// <summary>
/// Memory held per client: a thousand connections opened from this process (loopback TCP), each negotiated to
/// transmission (<see cref="IdleNbdClient"/>), held for a few seconds while the server's process tree is sampled, then
/// disconnected. The figure is the tree's peak resident set (for nbd-server, which forks per client, the sum over its
/// children; its proportional set size is read too, as that sum counts shared pages once per child).
/// </summary>
internal sealed partial class IdleConnectionsWorkload : IServerWorkload
{
    public const int Count = 1000;

    /// <summary>Handshakes in flight at once: enough to be quick, few enough not to overflow a listen backlog.</summary>
    private const int Concurrency = 16;

    private static readonly TimeSpan Hold = TimeSpan.FromSeconds(3);

    /// <summary>The whole measurement's bound: 1000 handshakes take a few seconds even when a server forks for each.</summary>
    private static readonly TimeSpan Budget = TimeSpan.FromMinutes(2);

    public static readonly IdleConnectionsWorkload Instance = new();

    public string Name => $"idle-{Count}";

    public string Title => $"{Count} idle connections (memory)";

    public Metric Metric => Metric.Memory;

    public async Task<RunResult> RunAsync(ServerUnderTest server, BenchOptions options, string work, int round)
    {
        await Task.Delay(500);
        var baseline = Processes.ResidentBytes(server.Pid);
        var cpuBefore = Processes.CpuSeconds(server.Pid);
        using var budget = new CancellationTokenSource(Budget);
        var clients = new List<IdleNbdClient>(Count);
        var failures = 0;
        string? firstFailure = null;
        long peak;
        long proportional;
        int established;
        double connectSeconds;
        try
        {
            await using (var sampler = new Processes.PeakSampler(server.Pid))
            {
                var watch = Stopwatch.StartNew();
                await Parallel.ForAsync(0, Count, new ParallelOptions { MaxDegreeOfParallelism = Concurrency, CancellationToken = budget.Token }, async (_, token) =>
                {
                    using var each = CancellationTokenSource.CreateLinkedTokenSource(token);
                    each.CancelAfter(TimeSpan.FromSeconds(15));
                    try
                    {
                        var client = await IdleNbdClient.ConnectAsync(server.Port, server.ExportName, each.Token);
                        lock (clients)
                        {
                            clients.Add(client);
                        }
                    }
                    catch (Exception exception) when (exception is IOException or SocketException or InvalidDataException or OperationCanceledException)
                    {
                        Interlocked.Increment(ref failures);
                        Interlocked.CompareExchange(ref firstFailure, exception.Message, null);
                    }
                });
                connectSeconds = watch.Elapsed.TotalSeconds;
                await Task.Delay(Hold, budget.Token);
                established = Processes.EstablishedConnections(server.Port);
                proportional = Processes.ProportionalBytes(server.Pid);
                peak = Math.Max(sampler.PeakBytes, Processes.ResidentBytes(server.Pid));
            }
        }
        finally
        {
            using var closing = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            await Parallel.ForEachAsync(clients, new ParallelOptions { MaxDegreeOfParallelism = Concurrency }, async (client, _) =>
            {
                await client.DisconnectAsync(closing.Token);
                await client.DisposeAsync();
            });
        }

        if (failures > 0)
        {
            Console.WriteLine($"bench: {server.Name}: {failures} of {Count} connections failed, the first: {firstFailure}");
        }

        await Task.Delay(300);
        var cpu = Processes.CpuSeconds(server.Pid) - cpuBefore;
        return new RunResult(Name, server.Name, round, 0, 0, double.NaN, double.NaN, cpu, peak, 0)
        {
            Connections = clients.Count,
            ElapsedSeconds = connectSeconds,
            BaselineRssBytes = baseline,
            ProportionalBytes = proportional,
            ServerConnections = established,
        };
    }

    /// <summary>
    /// Raises this process's soft RLIMIT_NOFILE (toward the hard limit) so it can hold <paramref name="needed"/>
    /// descriptors; called before the servers start, so they inherit it too (a server holds a descriptor per client).
    /// .NET usually raises it at start-up already.
    /// </summary>
    public static void EnsureFileLimit(ulong needed)
    {
        const int RlimitNofile = 7;
        if (GetRlimit(RlimitNofile, out var limit) != 0 || limit.Current >= needed)
        {
            return;
        }

        var raised = limit with { Current = Math.Min(limit.Maximum, Math.Max(needed, 4096)) };
        if (SetRlimit(RlimitNofile, in raised) != 0 || raised.Current < needed)
        {
            Console.WriteLine($"bench: only {raised.Current} file descriptors (hard limit {limit.Maximum}); some of the {Count} connections may fail");
        }
    }

    [LibraryImport("libc", EntryPoint = "getrlimit", SetLastError = true)]
    private static partial int GetRlimit(int resource, out RLimit limit);

    [LibraryImport("libc", EntryPoint = "setrlimit", SetLastError = true)]
    private static partial int SetRlimit(int resource, in RLimit limit);

    [StructLayout(LayoutKind.Sequential)]
    private record struct RLimit(ulong Current, ulong Maximum);
}
