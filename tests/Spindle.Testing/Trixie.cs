using System.Diagnostics;
using Xunit;

namespace Spindle.Testing;

/// <summary>
/// The Debian 13 "trixie" root that scripts/trixie-root.sh builds (scripts/install-deps.sh calls it), holding the peers
/// that speak NBD extended headers, which Debian 12 lacks: libnbd 1.22 (nbdinfo, nbdcopy, nbdsh, python3 nbd),
/// qemu 10 (qemu-img, qemu-io, qemu-nbd) and nbdkit 1.42. Its tools run with <c>chroot ROOT tool ...</c> through
/// <see cref="PeerTool"/>'s process running. The network (loopback included) is shared with the root; a Unix socket
/// must live inside the root to be reached from both sides, so tests put sockets and images in a
/// <see cref="TrixieScratch"/> (ROOT/tmp/spindle-tests/...), never bind-mounting anything into the root.
/// A missing root FAILS the test with a pointer to the script: interoperability is never skipped.
/// </summary>
public static class Trixie
{
    /// <summary>Where scripts/trixie-root.sh builds the root unless SPINDLE_TRIXIE_ROOT says otherwise.</summary>
    public const string DefaultRoot = "/var/cache/spindle/trixie-root";

    /// <summary>The stamp the script writes last, so its presence means a finished build.</summary>
    private const string StampFile = ".spindle-trixie-stamp";

    /// <summary>The root directory (SPINDLE_TRIXIE_ROOT, as for the script, else <see cref="DefaultRoot"/>).</summary>
    public static string Root => Environment.GetEnvironmentVariable("SPINDLE_TRIXIE_ROOT") is { Length: > 0 } root ? root : DefaultRoot;

    /// <summary>The root, or a failed test saying how to build it.</summary>
    public static string Require()
    {
        var root = Root;
        Assert.True(
            File.Exists(Path.Combine(root, StampFile)),
            $"the Debian 13 (trixie) root with the extended-header peers is missing at {root}: run scripts/trixie-root.sh as root " +
            "(scripts/install-deps.sh runs it; interop tests never skip a missing peer)");
        PeerTool.Require("chroot");
        return root;
    }

    /// <summary>The path inside the root of <paramref name="tool"/>, or a failed test if the root lacks it.</summary>
    public static string RequireTool(string tool)
    {
        var root = Require();
        if (tool.StartsWith('/'))
        {
            Assert.True(File.Exists(root + tool), $"{tool} is missing from the trixie root {root}: run scripts/trixie-root.sh --rebuild");
            return tool;
        }

        foreach (var directory in new[] { "/usr/bin", "/usr/sbin", "/bin", "/sbin" })
        {
            if (File.Exists(root + directory + "/" + tool))
            {
                return directory + "/" + tool;
            }
        }

        Assert.Fail($"{tool} is missing from the trixie root {root}: its package belongs in scripts/trixie-root.sh's list");
        return tool;
    }

    /// <summary>Runs <paramref name="tool"/> inside the root to completion, capturing its output.</summary>
    public static Task<ProcessResult> RunAsync(string tool, params string[] arguments) => RunAsync(tool, arguments, timeout: null);

    /// <summary>Runs <paramref name="tool"/> inside the root to completion (killed after <paramref name="timeout"/>).</summary>
    public static Task<ProcessResult> RunAsync(string tool, IEnumerable<string> arguments, TimeSpan? timeout, string? standardInput = null) =>
        PeerTool.RunAsync("chroot", ChrootArguments(tool, arguments), timeout, standardInput);

    /// <summary>Runs <paramref name="tool"/> inside the root and fails the test unless it exits with 0.</summary>
    public static Task<ProcessResult> RunCheckedAsync(string tool, IEnumerable<string> arguments, TimeSpan? timeout = null, string? standardInput = null) =>
        PeerTool.RunCheckedAsync("chroot", ChrootArguments(tool, arguments), timeout, standardInput);

    /// <summary>
    /// Starts a long-running tool (a peer server) inside the root. chroot execs the tool, so the process returned
    /// is the tool itself: stop it with <see cref="PeerTool.StopAsync"/>.
    /// </summary>
    public static Process Start(string tool, IEnumerable<string> arguments, Action<string>? onOutput = null) =>
        PeerTool.Start("chroot", ChrootArguments(tool, arguments), onOutput: onOutput);

    /// <summary>A scratch directory inside the root for images and Unix sockets, removed when disposed.</summary>
    public static TrixieScratch CreateScratch() => new(Require());

    private static List<string> ChrootArguments(string tool, IEnumerable<string> arguments) => [Require(), RequireTool(tool), .. arguments];
}

/// <summary>
/// A directory inside the trixie root (ROOT/tmp/spindle-tests/ID): the same files seen from this machine
/// (<see cref="HostPath"/>) and from a tool running in the root (<see cref="RootPath"/>).
/// </summary>
public sealed class TrixieScratch : IDisposable
{
    internal TrixieScratch(string root)
    {
        RootDirectory = "/tmp/spindle-tests/" + Guid.NewGuid().ToString("N")[..12];
        HostDirectory = root + RootDirectory;
        Directory.CreateDirectory(HostDirectory);
    }

    /// <summary>The directory as this machine sees it.</summary>
    public string HostDirectory { get; }

    /// <summary>The directory as a tool inside the root sees it.</summary>
    public string RootDirectory { get; }

    public string HostPath(string name) => Path.Combine(HostDirectory, name);

    public string RootPath(string name) => RootDirectory + "/" + name;

    public void Dispose()
    {
        try
        {
            Directory.Delete(HostDirectory, recursive: true);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
