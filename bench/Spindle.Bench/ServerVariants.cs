using System.Globalization;

namespace Spindle.Bench;

/// <summary>
/// The spindle executable measured: the one ./spindle builds into artifacts/spindle, whose <c>.built</c> stamp says
/// which kind it is ("native" for Native AOT, "readytorun" where the native toolchain is missing, "jit" for a plain
/// build), so the report can say what was measured.
/// </summary>
internal sealed record SpindleBinary(string Path, string Kind, string Version)
{
    public static SpindleBinary Find(string root)
    {
        var published = System.IO.Path.Combine(root, "artifacts", "spindle", "spindle");
        var (path, kind) = File.Exists(published)
            ? (published, KindOf(published))
            : (System.IO.Path.Combine(root, "src", "Spindle.Cli", "bin", "Release", "net10.0", "spindle"), "build output");
        return Describe(path, kind);
    }

    /// <summary>An executable elsewhere (a baseline build), its kind read from the <c>.built</c> stamp beside it.</summary>
    public static SpindleBinary At(string path) =>
        File.Exists(path) ? Describe(System.IO.Path.GetFullPath(path), KindOf(path)) : throw new FileNotFoundException($"{ServerVariants.BaselineVariable}: no file {path}", path);

    private static string KindOf(string executable)
    {
        var stamp = System.IO.Path.Combine(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(executable))!, ".built");
        return File.Exists(stamp) ? File.ReadAllText(stamp).Trim() : "unknown kind";
    }

    private static SpindleBinary Describe(string path, string kind)
    {
        var version = "?";
        try
        {
            var result = Processes.RunAsync(path, ["--version"], TimeSpan.FromSeconds(30)).GetAwaiter().GetResult();
            version = result.Output.Trim() is { Length: > 0 } text ? text : "?";
        }
        catch (Exception exception) when (exception is System.ComponentModel.Win32Exception or TimeoutException)
        {
            Console.WriteLine($"bench: {path} --version failed: {exception.Message}");
        }

        return new SpindleBinary(path, kind, version);
    }
}

/// <summary>
/// How a variant's image is made from the benchmark's raw image of random data, once per <see cref="Key"/> however
/// many variants share it. <see cref="PrepareAsync"/> takes the raw image and the work directory and returns the path
/// to serve.
/// </summary>
internal sealed record ImageSpec(string Key, Func<string, string, Task<string>> PrepareAsync)
{
    /// <summary>The raw image itself, as every server of the main comparison serves it.</summary>
    public static readonly ImageSpec Raw = new("raw", (raw, _) => Task.FromResult(raw));

    /// <summary>
    /// Each server serves a copy of its own, made afresh before every run that writes and before the first run after
    /// one, and checked by <see cref="CheckAsync"/> once the server has stopped after writing. False (raw): every
    /// server serves the prepared image itself, writes and all. True is for images that one server locks for writing
    /// (qcow2: qemu's image locks keep a second server out) or whose writes change what later runs measure (writes
    /// allocate clusters in a qcow2 image: a write run must meet the image as prepared, and so must the reads after).
    /// </summary>
    public bool CopyPerServer { get; init; }

    /// <summary>Called with the path of a server's copy each time it is made or renewed (before the server starts on it). Null: nothing to do.</summary>
    public Action<string>? Renewed { get; init; }

    /// <summary>Checks a server's copy after a run that wrote and returns a verdict for the console; throws when the image is damaged. Null: no check.</summary>
    public Func<string, Task<string>>? CheckAsync { get; init; }
}

/// <summary>
/// One row of the benchmark: a server (its command line, in <see cref="Create"/>) serving an image made by
/// <see cref="Image"/>. <see cref="Workloads"/> limits it to some workloads (null: every one), so a variant that only
/// matters for some figures does not lengthen the run with the rest.
/// </summary>
internal sealed record ServerVariant(string Name, ImageSpec Image, Func<ServerUnderTest> Create, IReadOnlySet<string>? Workloads = null)
{
    public bool Runs(string workload) => Workloads is null || Workloads.Contains(workload);
}

/// <summary>
/// A side-by-side comparison in the report: <see cref="Subject"/>'s figures against the best of
/// <see cref="References"/> in every workload both ran, as a ratio. Each comparison gets its own section.
/// </summary>
internal sealed record Comparison(string Name, string Title, string Subject, IReadOnlyList<string> References)
{
    public IEnumerable<string> Members => References.Prepend(Subject);
}

/// <summary>
/// The servers benchmarked and how they are compared: the extension point for new rows.
/// </summary>
/// <remarks>
/// To add rows, add variants and a comparison here; the loop, the filters (<c>--servers</c> takes variant names and
/// the <see cref="Groups"/>), the JSON and the report follow. The qcow2 rows (issue 13) are such variants:
/// <c>spindle-qcow2</c> and <c>qemu-nbd-qcow2</c> on a fully allocated qcow2 image, <c>spindle-qcow2-half</c> and
/// <c>qemu-nbd-qcow2-half</c> on a half allocated one (<see cref="Qcow2Images"/>), each limited to the four workloads
/// issue 13's targets name, with a comparison per image. An export with an overlay or a dirty bitmap against the
/// plain one (issue 14) is another: variants with extra <c>spindle serve</c> arguments (<see cref="LayerImages"/> for
/// the bitmap's own copy) and a comparison each whose subject is the variant and whose reference is "spindle".
/// </remarks>
internal static class ServerVariants
{
    public const string Spindle = "spindle";

    /// <summary>The main comparison: the targets of docs/performance.md are read from it.</summary>
    public const string Peers = "peers";

    /// <summary>Another spindle build to measure against, named by <see cref="BaselineVariable"/> (before/after a change).</summary>
    public const string Baseline = "spindle-baseline";

    /// <summary>The environment variable naming a baseline spindle executable; unset, there is no baseline row.</summary>
    public const string BaselineVariable = "SPINDLE_BENCH_BASELINE";

    /// <summary>The comparison of Spindle and qemu-nbd on a fully allocated qcow2 image (issue 13).</summary>
    public const string Qcow2 = "qcow2";

    /// <summary>The same on a half allocated qcow2 image: half the writes allocate clusters, half the reads meet holes.</summary>
    public const string Qcow2Half = "qcow2-half";

    /// <summary>
    /// The workloads of the qcow2 rows: the four issue 13's targets name (4k QD32 random read and write, 1M QD8
    /// sequential read and write), so the four variants take about 13 minutes at the default length, not 40.
    /// </summary>
    public static readonly IReadOnlySet<string> Qcow2Workloads = new HashSet<string>(StringComparer.Ordinal) { "randread-4k-qd32", "randwrite-4k-qd32", "read-1m-qd8", "write-1m-qd8" };

    /// <summary>The comparisons of a layered export against the plain one (issue 14), one per variant.</summary>
    public const string Layers = "layers";

    /// <summary>
    /// The workloads of the layer rows: where a layer could cost something. Random 4k reads and writes at QD32 (the
    /// per-request cost: an overlay's map lookup, a bitmap's bit test), 1M sequential reads and writes (the copy
    /// paths), and 4k reads at QD1 (latency added to one request).
    /// </summary>
    public static readonly IReadOnlySet<string> LayerWorkloads = new HashSet<string>(StringComparer.Ordinal) { "randread-4k-qd32", "randwrite-4k-qd32", "read-1m-qd8", "write-1m-qd8", "randread-4k-qd1" };

    /// <summary>The layered variants and the <c>spindle serve</c> arguments that make them.</summary>
    private static readonly (string Name, string Title, ImageSpec Image, string[] Arguments)[] LayerVariants =
    [
        ("spindle-cow", "A copy-on-write overlay (--cow) against the plain export", ImageSpec.Raw, ["--cow"]),
        ("spindle-bitmap", "A dirty bitmap (--bitmap) against the plain export", LayerImages.Bitmap, ["--bitmap", "bench"]),
        ("spindle-cow-bitmap", "A dirty bitmap over an overlay against the plain export", LayerImages.Bitmap, ["--cow", "--bitmap", "bench"]),
        ("spindle-overlay", "A persistent qcow2 overlay (--overlay) against the plain export", LayerImages.Bitmap, ["--overlay", SpindleServer.ImagePlaceholder + ".overlay.qcow2"]),
    ];

    /// <summary>Names <c>--servers</c> accepts for several variants at once.</summary>
    public static readonly IReadOnlyDictionary<string, IReadOnlyList<string>> Groups = new Dictionary<string, IReadOnlyList<string>>(StringComparer.Ordinal)
    {
        [Peers] = [Spindle, "nbdkit", "nbd-server", "qemu-nbd"],
        [Qcow2] = ["spindle-qcow2", "qemu-nbd-qcow2", "spindle-qcow2-half", "qemu-nbd-qcow2-half"],
        [Layers] = [Spindle, .. LayerVariants.Select(v => v.Name)],
    };

    /// <summary>
    /// The variants run when <c>--servers</c> is not given: the main comparison (and the baseline when set). The qcow2
    /// rows add about 13 minutes to a run of about 30, on a shared machine, so they run when named (<c>--servers qcow2</c>
    /// alone, <c>--servers peers,qcow2</c> in one report with the rest).
    /// </summary>
    public static IEnumerable<string> DefaultNames => Groups[Peers].Append(Baseline);

    /// <summary>The variants selected by <c>--servers</c> (null: <see cref="DefaultNames"/>).</summary>
    public static IReadOnlyList<ServerVariant> Selected(SpindleBinary binary, IReadOnlySet<string>? names)
    {
        var wanted = names ?? DefaultNames.ToHashSet(StringComparer.Ordinal);
        return [.. All(binary).Where(v => wanted.Contains(v.Name))];
    }

    /// <summary>Every variant's name, for <c>--servers</c> (the baseline only exists when <see cref="BaselineVariable"/> is set).</summary>
    public static IEnumerable<string> Names => Groups[Peers].Concat(Groups[Qcow2]).Concat(Groups[Layers].Skip(1)).Append(Baseline);

    private static string? BaselinePath => Environment.GetEnvironmentVariable(BaselineVariable) is { Length: > 0 } path ? path : null;

    public static IReadOnlyList<ServerVariant> All(SpindleBinary binary)
    {
        List<ServerVariant> variants =
        [
            new(Spindle, ImageSpec.Raw, () => new SpindleServer(Spindle, binary)),
            new("nbdkit", ImageSpec.Raw, () => new NbdkitServer()),
            new("nbd-server", ImageSpec.Raw, () => new NbdServerServer()),
            new("qemu-nbd", ImageSpec.Raw, () => new QemuNbdServer("qemu-nbd")),
            new("spindle-qcow2", Qcow2Images.Full, () => new SpindleServer("spindle-qcow2", binary, ["--format", "qcow2"]), Qcow2Workloads),
            new("qemu-nbd-qcow2", Qcow2Images.Full, () => new QemuNbdServer("qemu-nbd-qcow2", "qcow2"), Qcow2Workloads),
            new("spindle-qcow2-half", Qcow2Images.Half, () => new SpindleServer("spindle-qcow2-half", binary, ["--format", "qcow2"]), Qcow2Workloads),
            new("qemu-nbd-qcow2-half", Qcow2Images.Half, () => new QemuNbdServer("qemu-nbd-qcow2-half", "qcow2"), Qcow2Workloads),
            .. LayerVariants.Select(v => new ServerVariant(v.Name, v.Image, () => new SpindleServer(v.Name, binary, v.Arguments), LayerWorkloads)),
        ];
        if (BaselinePath is { } path)
        {
            var baseline = SpindleBinary.At(path);
            variants.Add(new(Baseline, ImageSpec.Raw, () => new SpindleServer(Baseline, baseline)));
        }

        return variants;
    }

    public static IReadOnlyList<Comparison> Comparisons =>
    [
        new(Peers, "Spindle and its peers, one raw image", Spindle, ["nbdkit", "nbd-server", "qemu-nbd"]),
        new(Qcow2, "A fully allocated qcow2 image: Spindle and qemu-nbd", "spindle-qcow2", ["qemu-nbd-qcow2"]),
        new(Qcow2Half, "A half allocated qcow2 image: Spindle and qemu-nbd", "spindle-qcow2-half", ["qemu-nbd-qcow2-half"]),
        .. LayerVariants.Select(v => new Comparison(v.Name, v.Title, v.Name, [Spindle])),
        .. BaselinePath is null ? Array.Empty<Comparison>() : [new Comparison(Baseline, $"This build against the baseline ({BaselineVariable})", Spindle, [Baseline])],
    ];

    /// <summary>Prepares each image the selected variants need, once per <see cref="ImageSpec.Key"/>.</summary>
    public static async Task<Dictionary<string, string>> PrepareImagesAsync(IEnumerable<ServerVariant> variants, string raw, string work)
    {
        var images = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var spec in variants.Select(v => v.Image).DistinctBy(i => i.Key))
        {
            images[spec.Key] = await spec.PrepareAsync(raw, work);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"bench: image {spec.Key}: {images[spec.Key]}"));
        }

        return images;
    }
}
