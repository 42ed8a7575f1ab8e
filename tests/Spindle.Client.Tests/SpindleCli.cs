using Spindle.Testing;

namespace Spindle.Client.Tests;

/// <summary>Runs the spindle binary built from this checkout (same configuration as the tests).</summary>
internal static class SpindleCli
{
    /// <summary>tests/Spindle.Client.Tests/bin/CONFIG/net10.0 → src/Spindle.Cli/bin/CONFIG/net10.0/spindle.</summary>
    public static string Path { get; } = Locate();

    public static Task<ProcessResult> RunAsync(params string[] arguments) => RunAsync(TimeSpan.FromSeconds(120), arguments);

    public static Task<ProcessResult> RunAsync(TimeSpan timeout, params string[] arguments) =>
        PeerTool.RunAsync(Path, arguments, timeout);

    private static string Locate()
    {
        var output = new DirectoryInfo(AppContext.BaseDirectory.TrimEnd('/'));
        var framework = output.Name;
        var configuration = output.Parent!.Name;
        var root = output.Parent!.Parent!.Parent!.Parent!.Parent!.FullName;
        return System.IO.Path.Combine(root, "src", "Spindle.Cli", "bin", configuration, framework, "spindle");
    }
}
