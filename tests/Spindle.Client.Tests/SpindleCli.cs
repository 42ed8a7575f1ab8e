using Spindle.Testing;

namespace Spindle.Client.Tests;

/// <summary>Runs the spindle binary under test ($SPINDLE_CLI, else the build from this checkout in the tests' configuration).</summary>
internal static class SpindleCli
{
    /// <summary>The executable under test: <see cref="SpindleExecutable.Path"/>.</summary>
    public static string Path => SpindleExecutable.Path;

    public static Task<ProcessResult> RunAsync(params string[] arguments) => RunAsync(TimeSpan.FromSeconds(120), arguments);

    public static Task<ProcessResult> RunAsync(TimeSpan timeout, params string[] arguments) =>
        PeerTool.RunAsync(Path, arguments, timeout);
}
