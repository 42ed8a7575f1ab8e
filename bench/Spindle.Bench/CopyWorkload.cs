using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Spindle.Bench;

/// <summary>
/// <c>spindle copy</c> against <c>nbdcopy</c>: the same export (served by Spindle) copied to <c>null:</c> and to a
/// file, whole processes timed (start-up included, as a user sees it), with their CPU time.
/// </summary>
internal static partial class CopyWorkload
{
    public static readonly string[] Destinations = ["null", "file"];

    public static readonly string[] Tools = ["spindle", "nbdcopy"];

    public static IEnumerable<string> Names => Destinations.Select(d => $"copy-to-{d}");

    [LibraryImport("libc", EntryPoint = "getrusage")]
    private static partial int GetRusage(int who, out RUsage usage);

    public static async Task<RunResult> RunAsync(string tool, string destination, string uri, long imageBytes, string spindleBinary, string work, int round)
    {
        var target = destination == "null" ? "null:" : Path.Combine(work, "copy-target.raw");
        if (destination == "file")
        {
            File.Delete(target);
        }

        var (program, arguments) = tool == "spindle"
            ? (spindleBinary, new[] { "copy", "--no-progress", "--quiet", uri, target })
            : ("nbdcopy", new[] { uri, target });
        var cpuBefore = ChildrenCpuSeconds();
        var watch = Stopwatch.StartNew();
        var result = await Processes.RunAsync(program, arguments, TimeSpan.FromMinutes(5));
        var elapsed = watch.Elapsed.TotalSeconds;
        var cpu = ChildrenCpuSeconds() - cpuBefore;
        if (result.ExitCode != 0)
        {
            throw new InvalidOperationException($"{program} {string.Join(' ', arguments)} failed: {result.Error}");
        }

        if (destination == "file")
        {
            File.Delete(target);
        }

        return new RunResult($"copy-to-{destination}", tool, round, 0, imageBytes / elapsed, elapsed * 1e6, double.NaN, cpu, 0, 0);
    }

    private static double ChildrenCpuSeconds()
    {
        // RUSAGE_CHILDREN (-1): every child waited for so far, user + system.
        _ = GetRusage(-1, out var usage);
        return usage.UserSeconds + (usage.UserMicroseconds / 1e6) + usage.SystemSeconds + (usage.SystemMicroseconds / 1e6);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct RUsage
    {
        public long UserSeconds;
        public long UserMicroseconds;
        public long SystemSeconds;
        public long SystemMicroseconds;

        // The remaining 14 longs of struct rusage (maxrss .. nivcsw), unread.
        public RUsageRest Rest;
    }

    [System.Runtime.CompilerServices.InlineArray(14)]
    private struct RUsageRest
    {
        private long _element;
    }
}
