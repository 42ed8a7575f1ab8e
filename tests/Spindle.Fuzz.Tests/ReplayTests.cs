using Spindle.Fuzz;
using Xunit;

namespace Spindle.Fuzz.Tests;

/// <summary>
/// Every fuzz target runs on every committed input in every test run: the fast, deterministic half of the fuzzing
/// (scripts/fuzz.sh is the exploring half). A crash the fuzzer once found stays fixed because its input is replayed.
/// </summary>
public sealed class ReplayTests
{
    public static TheoryData<string> Targets => [.. FuzzTargets.All.Select(target => target.Name)];

    [Theory]
    [MemberData(nameof(Targets))]
    public void Every_seed_and_regression_input_of_a_target_keeps_its_invariant(string name)
    {
        var target = FuzzTargets.Find(name)!;
        var files = FuzzInputs.Of(name).ToList();
        Assert.True(files.Count > 0, $"target {name} has no seed in Corpus/{name} (run: Spindle.Fuzz seeds tests/Spindle.Fuzz/Corpus)");
        var failures = FuzzInputs.Failures(target, files);
        Assert.True(failures.Count == 0, $"{failures.Count} of {files.Count} inputs broke {name}:\n" + string.Join("\n", failures));
    }

    [Theory]
    [MemberData(nameof(Targets))]
    public void Every_other_targets_inputs_keep_a_targets_invariant_too(string name)
    {
        var target = FuzzTargets.Find(name)!;
        var files = FuzzInputs.All().Where(file => Path.GetFileName(Path.GetDirectoryName(file)) != name).ToList();
        Assert.True(files.Count >= FuzzTargets.All.Count - 1, $"only {files.Count} inputs of other targets found under {FuzzInputs.Root}");
        var failures = FuzzInputs.Failures(target, files);
        Assert.True(failures.Count == 0, $"{failures.Count} of {files.Count} other targets' inputs broke {name}:\n" + string.Join("\n", failures));
    }

    [Fact]
    public void Every_target_has_a_corpus_folder_and_every_corpus_folder_a_target()
    {
        var targets = FuzzTargets.All.Select(target => target.Name).Order(StringComparer.Ordinal).ToList();
        var folders = Directory.GetDirectories(FuzzInputs.Corpus).Select(folder => Path.GetFileName(folder)!).Order(StringComparer.Ordinal).ToList();
        Assert.Equal(targets, folders);
        if (Directory.Exists(FuzzInputs.Regressions))
        {
            Assert.All(Directory.GetDirectories(FuzzInputs.Regressions), folder => Assert.Contains(Path.GetFileName(folder), targets));
        }
    }
}
