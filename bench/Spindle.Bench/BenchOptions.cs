using System.Globalization;

namespace Spindle.Bench;

/// <summary>Command-line options of the benchmark.</summary>
internal sealed record BenchOptions(string RepositoryRoot, int Rounds, TimeSpan Duration, long ImageBytes, string? Output, HashSet<string>? Servers, HashSet<string>? Workloads)
{
    /// <summary>
    /// The default run: 3 rounds of 10 s per workload on a 1 GiB image, every workload, the servers of
    /// <see cref="ServerVariants.DefaultNames"/> (null <see cref="Servers"/>).
    /// </summary>
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
                    servers = [.. args[++i].Split(',').SelectMany(name => ServerVariants.Groups.TryGetValue(name, out var group) ? group : [name])];
                    if (servers.FirstOrDefault(name => !ServerVariants.Names.Contains(name)) is { } unknown)
                    {
                        Console.Error.WriteLine($"unknown server '{unknown}': the servers are {string.Join(' ', ServerVariants.Names)}, the groups {string.Join(' ', ServerVariants.Groups.Keys)}");
                        return null;
                    }

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
                                         [--servers NAME,... (peers)] [--workloads NAME,... (all)]
                                         [--output FILE (docs/performance.md) | --stdout]
                        servers: {string.Join(' ', ServerVariants.Names)}
                          groups: peers ({string.Join(',', ServerVariants.Groups[ServerVariants.Peers])}: the raw image),
                                  qcow2 ({string.Join(',', ServerVariants.Groups[ServerVariants.Qcow2])}:
                                  a fully and a half allocated qcow2 image, the 4 workloads {string.Join(',', ServerVariants.Qcow2Workloads)},
                                  each server on its own copy, renewed for every write run and checked by qemu-img check after it)
                                  layers ({string.Join(',', ServerVariants.Groups[ServerVariants.Layers])}:
                                  a temporary overlay, a dirty bitmap, both, and a persistent qcow2 overlay against the plain export, the 5 workloads {string.Join(',', ServerVariants.LayerWorkloads)})
                          spindle-baseline runs when {ServerVariants.BaselineVariable} names a spindle executable.
                          The default is peers (and the baseline when set): the qcow2 rows add about 13 minutes, so they run
                          when named: --servers qcow2 --output docs/performance-qcow2.md (alone: about 15 minutes), or
                          --servers peers,qcow2 (one report with every row). A subset written to docs/performance.md replaces it.
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
    /// handshakes, the restart), plus the limits and the images. A server on a copy of its own spends about 4 s per
    /// GiB around each write run (a fresh copy before it, qemu-img check after it, a fresh copy for the next run).
    /// Estimates, not promises: the machine is shared.
    /// </summary>
    public TimeSpan Estimate(IReadOnlyList<ServerVariant> variants)
    {
        bool Selected(string name) => Workloads is null || Workloads.Contains(name);
        var gib = ImageBytes / (double)(1L << 30);
        var perRound = 0.0;
        foreach (var variant in variants)
        {
            bool Runs(string name) => Selected(name) && variant.Runs(name);
            perRound += FioWorkload.All.Where(w => Runs(w.Name)).Sum(w => Duration.TotalSeconds + 1 + 2.5 + (variant.Image.CopyPerServer && w.Writes ? 4 * gib : 0));
            perRound += NbdcopyWorkload.All.Count(w => Runs(w.Name)) * ((NbdcopyWorkload.Repetitions * (gib + 0.2)) + 1.5);
            perRound += Runs(IdleConnectionsWorkload.Instance.Name) ? 8 : 0;
        }

        var clientCopies = CopyWorkload.Names.Count(Selected) * CopyWorkload.Tools.Length * (gib + 0.5);
        var images = variants.Select(v => v.Image).Where(i => i != ImageSpec.Raw).Distinct().Count() * 8 * gib;
        var limits = (3 * Math.Min(5, Duration.TotalSeconds)) + 3 + (2 * (Duration.TotalSeconds + 1)) + (8 * gib);
        return TimeSpan.FromSeconds(limits + images + (Rounds * (perRound + clientCopies)));
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
