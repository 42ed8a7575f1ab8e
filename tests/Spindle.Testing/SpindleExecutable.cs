namespace Spindle.Testing;

/// <summary>
/// The <c>spindle</c> command that tests run as a separate process, found in one place so the whole suite can be
/// pointed at one build. <c>$SPINDLE_CLI</c>, when set, names it: scripts/test.sh publishes the Native AOT
/// executable (what users run) and sets it, so every test proves that build. Otherwise it is the build output of
/// src/Spindle.Cli in the test's own configuration: next to the test when the project copies it there, else in
/// src/Spindle.Cli/bin/CONFIGURATION/FRAMEWORK.
/// </summary>
public static class SpindleExecutable
{
    /// <summary>The environment variable naming the executable to test.</summary>
    public const string Variable = "SPINDLE_CLI";

    /// <summary>The full path of the executable (an apphost or a native binary; never "dotnet spindle.dll").</summary>
    public static string Path { get; } = Locate();

    private static string Locate()
    {
        if (Environment.GetEnvironmentVariable(Variable) is { Length: > 0 } chosen)
        {
            var full = System.IO.Path.GetFullPath(chosen);
            // A wrong path must fail loudly, not fall back silently to another build.
            return File.Exists(full) ? full : throw new FileNotFoundException($"{Variable}={chosen}: no such file", full);
        }

        var output = new DirectoryInfo(AppContext.BaseDirectory.TrimEnd('/'));
        // An apphost is only usable with its spindle.dll beside it (a build of one test project can copy the one alone).
        var beside = System.IO.Path.Combine(output.FullName, "spindle");
        if (File.Exists(beside) && File.Exists(beside + ".dll"))
        {
            return beside;
        }

        // tests/PROJECT/bin/CONFIGURATION/FRAMEWORK -> src/Spindle.Cli/bin/CONFIGURATION/FRAMEWORK/spindle.
        var framework = output.Name;
        var configuration = output.Parent?.Name ?? "Release";
        return System.IO.Path.Combine(TestCertificates.RepositoryRoot(), "src", "Spindle.Cli", "bin", configuration, framework, "spindle");
    }
}
