using System.Text.Json;
using System.Text.RegularExpressions;
using Spindle.Fuse.Devices;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests.Support;

/// <summary>
/// One <c>spindle attach</c> in a private run directory (SPINDLE_RUN_DIR), so its state, log, mount point and
/// by-uuid/by-label/by-serial links never meet /run/spindle or another test's. Disposing removes whatever is left,
/// even after a failure: detach, and failing that every piece by hand.
/// </summary>
internal sealed partial class Attachment(string runDirectory, string name) : IAsyncDisposable
{
    public string RunDirectory { get; } = runDirectory;

    public string Name { get; } = name;

    public string MountPoint => Path.Combine(RunDirectory, "mnt", Name);

    /// <summary>The FUSE file the loop device is bound to.</summary>
    public string File => Path.Combine(MountPoint, "disk");

    public string StatePath => Path.Combine(RunDirectory, Name + ".json");

    public string LogPath => Path.Combine(RunDirectory, Name + ".log");

    /// <summary>The mount server's log so far (empty once detach removed it).</summary>
    public string Log
    {
        get
        {
            try
            {
                return System.IO.File.ReadAllText(LogPath);
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
            {
                return string.Empty;
            }
        }
    }

    /// <summary>How many times the client got a lost connection back (its "reconnected after" log lines).</summary>
    public int Reconnections => ReconnectedLine().Count(Log);

    /// <summary>Each connection the client lost, from its log, in order: the server (HOST:PORT) and the requests it had in flight.</summary>
    public IReadOnlyList<(string Server, int InFlight)> Losses() =>
        [.. LostLine().Matches(Log).Select(match => (match.Groups[1].Value, int.Parse(match.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture)))];

    /// <summary>Runs <c>spindle attach ARGS --name NAME</c> and returns the loop device it printed.</summary>
    public async Task<string> AttachAsync(params string[] arguments)
    {
        Directory.CreateDirectory(RunDirectory);
        var result = await RunAsync(["attach", .. arguments, "--name", Name]);
        Assert.True(result.ExitCode == 0, $"spindle attach failed: {result}\n{Log}");
        var device = result.StandardOutput.Trim();
        Assert.StartsWith("/dev/loop", device, StringComparison.Ordinal);
        return device;
    }

    public Task<ProcessResult> DetachAsync() => RunAsync(["detach", Name]);

    /// <summary>The mount server's pid from the state file (0 when there is none).</summary>
    public int Pid => ReadState() is { } state && state.TryGetProperty("pid", out var pid) ? pid.GetInt32() : 0;

    /// <summary>Where RUN/KIND/VALUE points (KIND: by-uuid, by-label, by-serial), or null if there is no such link.</summary>
    public string? LinkTarget(string kind, string value) => new FileInfo(Path.Combine(RunDirectory, kind, value)).LinkTarget;

    public async ValueTask DisposeAsync()
    {
        if (!System.IO.File.Exists(StatePath) && !Directory.Exists(MountPoint))
        {
            return;
        }

        var detach = await DetachAsync();
        if (detach.ExitCode == 0)
        {
            return;
        }

        TestContext.Current.TestOutputHelper?.WriteLine($"cleanup: detach failed, removing the attachment by hand: {detach}\n{Log}");
        foreach (var device in LoopDevice.List().Where(d => d.BackingFile.StartsWith(MountPoint + "/", StringComparison.Ordinal)))
        {
            await PeerTool.RunAsync("losetup", ["-d", device.Device]);
        }

        var pid = Pid;
        if (pid > 0 && DaemonProcess.CommandLine(pid).Contains("--serve-daemon"))
        {
            DaemonProcess.Signal(pid, DaemonProcess.SigKill);
        }

        SpindleCli.EnsureUnmounted(MountPoint);
        try
        {
            Directory.Delete(MountPoint);
        }
        catch (IOException)
        {
        }

        System.IO.File.Delete(StatePath);
    }

    private Task<ProcessResult> RunAsync(string[] arguments) =>
        PeerTool.RunAsync(SpindleCli.Program, arguments, TimeSpan.FromSeconds(120), environment: new Dictionary<string, string> { ["SPINDLE_RUN_DIR"] = RunDirectory });

    private JsonElement? ReadState()
    {
        try
        {
            return JsonDocument.Parse(System.IO.File.ReadAllText(StatePath)).RootElement.Clone();
        }
        catch (Exception exception) when (exception is IOException or JsonException)
        {
            return null;
        }
    }

    [GeneratedRegex(@"reconnected after [0-9.]+ s")]
    private static partial Regex ReconnectedLine();

    [GeneratedRegex(@"\] (\S+): connection lost with (\d+) requests in flight")]
    private static partial Regex LostLine();
}
