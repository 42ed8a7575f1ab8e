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

    /// <summary>A qcow2 copy of the raw image (qemu-img convert), e.g. for qcow2 rows.</summary>
    public static readonly ImageSpec Qcow2 = new("qcow2", async (raw, work) =>
    {
        var path = System.IO.Path.Combine(work, "image.qcow2");
        var result = await Processes.RunAsync("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, path], TimeSpan.FromMinutes(5));
        return result.ExitCode == 0 ? path : throw new InvalidOperationException("qemu-img convert failed: " + result.Error);
    });
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
/// To add rows, add variants and a comparison here; the loop, the filters (<c>--servers</c> takes variant names),
/// the JSON and the report follow. For example, qcow2 images (issue 13):
/// <code>
/// new("spindle-qcow2", ImageSpec.Qcow2, () => new SpindleServer("spindle-qcow2", binary)),
/// new("qemu-nbd-qcow2", ImageSpec.Qcow2, () => new QemuNbdServer("qemu-nbd-qcow2", "qcow2")),
/// // and: new Comparison("qcow2", "A qcow2 image: Spindle and qemu-nbd", "spindle-qcow2", ["qemu-nbd-qcow2"])
/// </code>
/// An export with an overlay or a dirty bitmap against the plain one (issue 14): a variant with its own
/// <see cref="ImageSpec"/> (e.g. one that creates the overlay) and its extra <c>spindle serve</c> arguments, and a
/// comparison whose subject is that variant and whose reference is "spindle".
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

    private static string? BaselinePath => Environment.GetEnvironmentVariable(BaselineVariable) is { Length: > 0 } path ? path : null;

    public static IReadOnlyList<ServerVariant> All(SpindleBinary binary)
    {
        List<ServerVariant> variants =
        [
            new(Spindle, ImageSpec.Raw, () => new SpindleServer(Spindle, binary)),
            new("nbdkit", ImageSpec.Raw, () => new NbdkitServer()),
            new("nbd-server", ImageSpec.Raw, () => new NbdServerServer()),
            new("qemu-nbd", ImageSpec.Raw, () => new QemuNbdServer("qemu-nbd")),
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
