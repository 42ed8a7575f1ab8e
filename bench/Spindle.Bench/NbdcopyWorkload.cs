using System.Diagnostics;
using System.Globalization;

namespace Spindle.Bench;

/// <summary>
/// The whole export copied by <c>nbdcopy</c> to <c>null:</c> (read and discarded) with <see cref="Connections"/>
/// connections: what a backup or an imaging tool asks of a server. Bandwidth is the export size over the copy's
/// time (the whole process, start-up included, as for fio's ramp-free view of a user).
/// </summary>
/// <remarks>
/// nbdcopy opens <c>-C N</c> connections only when the server advertises NBD_FLAG_CAN_MULTI_CONN, and never more than
/// its threads (<c>-T</c>, by default the number of cores, 2 here), so both are passed. The connections actually used
/// are counted on the server's side (<see cref="Processes.ConnectionSampler"/>) and reported, and the multi-conn flag
/// is read with nbdinfo once per server.
/// </remarks>
internal sealed class NbdcopyWorkload(int connections) : IServerWorkload
{
    /// <summary>Copies per round, after one restart: a 1 GiB copy lasts about half a second, one alone is noisy.</summary>
    public const int Repetitions = 3;

    public static readonly IReadOnlyList<NbdcopyWorkload> All = [new(1), new(4)];

    public int Connections => connections;

    public string Name => $"nbdcopy-null-{connections}conn";

    public string Title => $"nbdcopy to null:, {connections} connection{(connections == 1 ? string.Empty : "s")}";

    public Metric Metric => Metric.Bandwidth;

    public async Task<RunResult> RunAsync(ServerUnderTest server, BenchOptions options, string work, int round)
    {
        var count = connections.ToString(CultureInfo.InvariantCulture);
        string[] arguments = ["-C", count, "-T", count, server.Uri, "null:"];
        var seconds = new List<double>();
        var cpuBefore = Processes.CpuSeconds(server.Pid);
        long peak;
        int used;
        await using (var sampler = new Processes.PeakSampler(server.Pid))
        await using (var connectionsSeen = new Processes.ConnectionSampler(server.Port))
        {
            for (var i = 0; i < Repetitions; i++)
            {
                var watch = Stopwatch.StartNew();
                var result = await Processes.RunAsync("nbdcopy", arguments, TimeSpan.FromMinutes(5));
                seconds.Add(watch.Elapsed.TotalSeconds);
                if (result.ExitCode != 0)
                {
                    throw new InvalidOperationException($"nbdcopy {Processes.Describe(arguments)} failed ({result.ExitCode}): {result.Error}");
                }
            }

            peak = sampler.PeakBytes;
            used = connectionsSeen.Peak;
        }

        await Task.Delay(300);
        var cpu = (Processes.CpuSeconds(server.Pid) - cpuBefore) / Repetitions;
        var median = seconds.Order().ElementAt(seconds.Count / 2);
        return new RunResult(Name, server.Name, round, 0, options.ImageBytes / median, double.NaN, double.NaN, cpu, peak, 0) { Connections = used, ElapsedSeconds = median };
    }

    /// <summary>Whether the server advertises NBD_FLAG_CAN_MULTI_CONN, as nbdinfo reads it (null: nbdinfo failed).</summary>
    public static async Task<bool?> CanMultiConnAsync(ServerUnderTest server)
    {
        var result = await Processes.RunAsync("nbdinfo", ["--can", "multi-conn", server.Uri], TimeSpan.FromSeconds(30));

        // nbdinfo --can exits 0 for yes, 2 for no, anything else for an error.
        return result.ExitCode switch
        {
            0 => true,
            2 => false,
            _ => null,
        };
    }
}
