using System.Globalization;

namespace Spindle.Bench;

/// <summary>Command-line options of the benchmark.</summary>
internal sealed record BenchOptions(string RepositoryRoot, int Rounds, TimeSpan Duration, long ImageBytes, string? Output, HashSet<string>? Servers, HashSet<string>? Workloads)
{
    /// <summary>The default run: 3 rounds of 10 s per workload on a 1 GiB image, every server and workload.</summary>
    public static BenchOptions Defaults(string root) => new(root, 3, TimeSpan.FromSeconds(10), 1L << 30, Path.Combine(root, "docs", "performance.md"), null, null);

    public static BenchOptions? Parse(string[] args)
    {
        var root = FindRoot();
        var defaults = Defaults(root);
        var rounds = defaults.Rounds;
        var duration = defaults.Duration;
        var image = defaults.ImageBytes;
        var output = defaults.Output;
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
                                         [--servers spindle,nbdkit,nbd-server,qemu-nbd] [--workloads NAME,...]
                                         [--output FILE (docs/performance.md) | --stdout]
                        workloads: {string.Join(' ', ServerWorkloads.All.Select(w => w.Name).Concat(CopyWorkload.Names))}
                        """);
                    return null;
            }
        }

        return new BenchOptions(root, rounds, duration, image, output, servers, workloads);
    }

    /// <summary>
    /// About how long the run takes, for the console: each server run costs its fio time plus a restart and fio's
    /// start (about 2.5 s), each nbdcopy run its copies at about 1 GiB/s, each idle run about 8 s (the hold, the
    /// handshakes, the restart), plus the limits and the image. Estimates, not promises: the machine is shared.
    /// </summary>
    public TimeSpan Estimate(int servers)
    {
        bool Selected(string name) => Workloads is null || Workloads.Contains(name);
        var gib = ImageBytes / (double)(1L << 30);
        var fio = FioWorkload.All.Count(w => Selected(w.Name)) * (Duration.TotalSeconds + 1 + 2.5);
        var copies = NbdcopyWorkload.All.Count(w => Selected(w.Name)) * ((NbdcopyWorkload.Repetitions * (gib + 0.2)) + 1.5);
        var idle = Selected(IdleConnectionsWorkload.Instance.Name) ? 8 : 0;
        var clientCopies = CopyWorkload.Names.Count(Selected) * CopyWorkload.Tools.Length * (gib + 0.5);
        var limits = (3 * Math.Min(5, Duration.TotalSeconds)) + 3 + (2 * (Duration.TotalSeconds + 1)) + (8 * gib);
        return TimeSpan.FromSeconds(limits + (Rounds * ((servers * (fio + copies + idle)) + clientCopies)));
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
