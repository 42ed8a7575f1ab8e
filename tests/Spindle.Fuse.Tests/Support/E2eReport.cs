using System.Text.Json;
using Xunit;

namespace Spindle.Fuse.Tests.Support;

/// <summary>
/// The figures an end-to-end test observed (restarts survived, files and bytes verified, the longest stall): written
/// to the test output and as a diagnostic message, and appended as one JSON line to the file named by
/// SPINDLE_E2E_REPORT when it is set, for the documentation and release notes.
/// </summary>
internal static class E2eReport
{
    public const string Variable = "SPINDLE_E2E_REPORT";

    private static readonly Lock FileLock = new();

    public static void Record(string test, IEnumerable<KeyValuePair<string, object?>> figures)
    {
        var entry = new Dictionary<string, object?>
        {
            ["test"] = test,
            ["at"] = DateTimeOffset.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", System.Globalization.CultureInfo.InvariantCulture),
        };
        foreach (var (key, value) in figures)
        {
            entry[key] = value is double number ? Math.Round(number, 3) : value;
        }

        var line = JsonSerializer.Serialize(entry);
        TestContext.Current.TestOutputHelper?.WriteLine(line);
        TestContext.Current.SendDiagnosticMessage(line);
        if (Environment.GetEnvironmentVariable(Variable) is { Length: > 0 } path)
        {
            lock (FileLock)
            {
                File.AppendAllText(path, line + "\n");
            }
        }
    }
}
