using Spindle.Fuzz;

namespace Spindle.Fuzz.Tests;

/// <summary>The committed fuzz inputs: tests/Spindle.Fuzz/Corpus/TARGET (seeds) and Regressions/TARGET (found bugs).</summary>
internal static class FuzzInputs
{
    public static string Root { get; } = FindRoot();

    public static string Corpus => Path.Combine(Root, "Corpus");

    public static string Regressions => Path.Combine(Root, "Regressions");

    public static IEnumerable<string> Of(string target) =>
        new[] { Path.Combine(Corpus, target), Path.Combine(Regressions, target) }
            .Where(Directory.Exists)
            .SelectMany(Directory.GetFiles)
            .Order(StringComparer.Ordinal);

    public static IEnumerable<string> All() =>
        new[] { Corpus, Regressions }
            .Where(Directory.Exists)
            .SelectMany(folder => Directory.GetFiles(folder, "*", SearchOption.AllDirectories))
            .Where(file => Path.GetFileName(Path.GetDirectoryName(file)) is { } target && FuzzTargets.Find(target) is not null)
            .Order(StringComparer.Ordinal);

    /// <summary>Runs <paramref name="target"/> on each file; the failures, each naming its file and what broke.</summary>
    public static List<string> Failures(FuzzTarget target, IEnumerable<string> files)
    {
        var failures = new List<string>();
        foreach (var file in files)
        {
            try
            {
                target.Run(File.ReadAllBytes(file));
            }
            catch (Exception exception)
            {
                failures.Add($"{Path.GetRelativePath(Root, file)}: {exception.GetType().Name}: {exception.Message}\n{exception.StackTrace}");
            }
        }

        return failures;
    }

    /// <summary>The source folder, found upwards from the test binaries, so inputs saved by scripts/fuzz.sh count at once.</summary>
    private static string FindRoot()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "Spindle.slnx")))
            {
                return Path.Combine(directory.FullName, "tests", "Spindle.Fuzz");
            }
        }

        throw new DirectoryNotFoundException($"no Spindle.slnx above {AppContext.BaseDirectory}: the fuzz inputs live in the source tree");
    }
}
