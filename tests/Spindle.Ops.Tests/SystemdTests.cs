using System.Net.Sockets;
using System.Text;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>
/// Spindle under systemd, proven with systemd's own tools: systemd-socket-activate passes listening sockets the way a
/// .socket unit does; a NOTIFY_SOCKET harness receives what sd_notify would; systemd-analyze verify checks the units
/// as installed by scripts/install.sh.
/// </summary>
public sealed class SystemdTests
{
    [Fact]
    public async Task Socket_activation_serves_the_tcp_and_unix_sockets_systemd_passes()
    {
        using var directory = new TempDirectory();
        var port = OpsServer.FreePort();
        var unix = directory.File("nbd.sock");
        var output = new System.Collections.Concurrent.ConcurrentQueue<string>();

        // systemd-socket-activate binds both, then (on the first connection) execs spindle with LISTEN_FDS=2,
        // LISTEN_PID and LISTEN_FDNAMES, exactly as systemd does for spindle.socket.
        var activator = PeerTool.Start(PeerTool.Require("systemd-socket-activate"),
            ["-l", $"127.0.0.1:{port}", "-l", unix, "--fdname=nbd:nbdunix", SpindleExecutable.Path, "serve", "--memory", "16M"], onOutput: output.Enqueue);
        try
        {
            await WaitForAsync(() => File.Exists(unix), "the activator's Unix socket");
            var tcp = await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1M", $"nbd://127.0.0.1:{port}/"]);
            Assert.Contains("wrote 1048576/1048576", tcp.StandardOutput, StringComparison.Ordinal);
            var read = await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 0 1M", $"nbd+unix:///?socket={unix}"]);
            Assert.Contains("read 1048576/1048576", read.StandardOutput, StringComparison.Ordinal);
            Assert.Contains(output, line => line.Contains("Socket activation: serving 2 socket(s) passed by systemd (nbd, nbdunix)", StringComparison.Ordinal));
        }
        finally
        {
            await PeerTool.StopAsync(activator);
        }

        // The sockets belong to whoever passed them: Spindle leaves the Unix socket file alone.
        Assert.True(File.Exists(unix));
    }

    [Fact]
    public async Task Notifications_reach_the_notify_socket_ready_status_watchdog_reloading_stopping()
    {
        using var directory = new TempDirectory();
        var notifyPath = directory.File("notify.sock");
        using var notify = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        notify.Bind(new UnixDomainSocketEndPoint(notifyPath));
        var messages = new System.Collections.Concurrent.ConcurrentQueue<string>();
        using var stop = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        var receiver = Task.Run(async () =>
        {
            var buffer = new byte[4096];
            while (!stop.IsCancellationRequested)
            {
                var received = await notify.ReceiveAsync(buffer, SocketFlags.None, stop.Token);
                messages.Enqueue(Encoding.UTF8.GetString(buffer, 0, received));
            }
        });

        var environment = new Dictionary<string, string>
        {
            ["NOTIFY_SOCKET"] = notifyPath,
            ["WATCHDOG_USEC"] = "400000",
            ["JOURNAL_STREAM"] = "8:12345",
        };
        await using var server = await OpsServer.StartAsync("[disk]\n    backend = memory\n    size = 4M\n", control: false, environment: environment, directory: directory);
        await WaitForAsync(() => messages.Any(m => m.Contains("READY=1", StringComparison.Ordinal)), "READY=1");
        var ready = messages.First(m => m.Contains("READY=1", StringComparison.Ordinal));
        Assert.Contains($"MAINPID={server.Process.Id}", ready, StringComparison.Ordinal);
        Assert.Contains("STATUS=Serving 1 export to 0 connections", ready, StringComparison.Ordinal);

        // WatchdogSec=: a ping every half interval.
        await WaitForAsync(() => messages.Count(m => m == "WATCHDOG=1") >= 3, "three WATCHDOG=1");

        // A reload is bracketed by RELOADING=1 (with MONOTONIC_USEC) and READY=1.
        server.Signal(1);
        await WaitForAsync(() => messages.Any(m => m.StartsWith("RELOADING=1\nMONOTONIC_USEC=", StringComparison.Ordinal)), "RELOADING=1");
        await WaitForAsync(() => messages.Count(m => m.Contains("READY=1", StringComparison.Ordinal)) >= 2, "READY=1 after the reload");

        // STATUS= follows the connections.
        await using (var client = await Spindle.Client.NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: TestContext.Current.CancellationToken))
        {
            await WaitForAsync(() => messages.Any(m => m == "STATUS=Serving 1 export to 1 connection"), "STATUS with one connection");
        }

        Assert.Equal(0, await server.StopAsync());
        await WaitForAsync(() => messages.Any(m => m.StartsWith("STOPPING=1", StringComparison.Ordinal)), "STOPPING=1");
        await stop.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => receiver);

        // Under the journal (JOURNAL_STREAM set): syslog priorities, and no timestamp of Spindle's own.
        var logs = server.Output.Where(line => line.Length > 0).ToList();
        Assert.Contains(logs, line => line.StartsWith("<6>Spindle", StringComparison.Ordinal));
        Assert.All(logs, line => Assert.Matches(@"^<[0-7]>", line));
        Assert.DoesNotContain(logs, line => System.Text.RegularExpressions.Regex.IsMatch(line, @"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"));
    }

    [Fact]
    public async Task Installed_units_pass_systemd_analyze_verify_with_their_man_pages()
    {
        using var install = await Installation.CreateAsync();
        var units = new[] { "spindle.service", "spindle.socket" }.Select(install.Unit).ToList();

        // An instance of the template, as systemctl start spindle-attach@disk would make.
        var instance = install.Unit("spindle-attach@disk.service");
        File.Copy(install.Unit("spindle-attach@.service"), instance);
        units.Add(instance);

        // Documentation=man:... is checked too: MANPATH points at the pages the same command installed.
        var verify = await PeerTool.RunAsync("systemd-analyze", new[] { "verify" }.Concat(units), environment: new Dictionary<string, string> { ["MANPATH"] = install.ManPath });
        Assert.True(verify.ExitCode == 0, verify.ToString());
        Assert.Equal(string.Empty, verify.StandardError.Trim());

        var service = await File.ReadAllTextAsync(install.Unit("spindle.service"), TestContext.Current.CancellationToken);
        Assert.Contains("Type=notify", service, StringComparison.Ordinal);
        Assert.Contains($"ExecStart={install.Prefix}/bin/spindle serve --config {install.SysConfDir}/spindle/spindle.conf", service, StringComparison.Ordinal);
        Assert.Contains("ExecReload=/bin/kill -HUP $MAINPID", service, StringComparison.Ordinal);
        Assert.Contains("WatchdogSec=", service, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Installed_man_pages_render_and_the_bash_completion_completes_commands_verbs_and_options()
    {
        using var install = await Installation.CreateAsync();

        // A page for spindle and one per command its --help lists, each found by man through MANPATH and rendered by
        // groff without a warning.
        var help = (await PeerTool.RunCheckedAsync(install.Binary, ["--help"])).StandardOutput;
        // Under "Commands:", a command's line is indented by two spaces (a wrapped description by more).
        var commands = help[help.IndexOf("Commands:", StringComparison.Ordinal)..].Split('\n').Skip(1)
            .Where(line => line.StartsWith("  ", StringComparison.Ordinal) && line.Length > 2 && line[2] != ' ')
            .Select(line => line.Trim().Split(' ', 2)[0]).ToList();
        Assert.Contains("serve", commands);
        Assert.Contains("ctl", commands);
        var manual = new Dictionary<string, string> { ["MANPATH"] = install.ManPath, ["MANWIDTH"] = "100" };
        foreach (var page in commands.Select(c => "spindle-" + c).Prepend("spindle"))
        {
            var located = await PeerTool.RunAsync("man", ["-w", page], environment: manual);
            Assert.True(located.ExitCode == 0, $"{page}: {located}");
            Assert.StartsWith(install.ManPath, located.StandardOutput.Trim(), StringComparison.Ordinal);
            var rendered = await PeerTool.RunAsync("man", ["--warnings", "-P", "cat", page], environment: manual);
            Assert.True(rendered.ExitCode == 0 && rendered.StandardError.Trim().Length == 0, $"{page}: {rendered}");
            Assert.Contains("NAME", rendered.StandardOutput, StringComparison.Ordinal);
        }

        // The completion the same command installed, driven as bash drives it.
        Assert.Equal("ctl", await CompleteAsync(install.Completion, "spindle", "ct"));
        Assert.Equal("reload remove", await CompleteAsync(install.Completion, "spindle", "ctl", "re"));
        Assert.Equal("--metrics", await CompleteAsync(install.Completion, "spindle", "serve", "--metr"));
    }

    private static async Task<string> CompleteAsync(string completion, params string[] words)
    {
        var script = $"source '{completion}'; COMP_WORDS=({string.Join(' ', words.Select(w => $"'{w}'"))}); COMP_CWORD={words.Length - 1}; "
            + "COMP_LINE=\"${COMP_WORDS[*]}\"; COMP_POINT=${#COMP_LINE}; _spindle spindle; printf '%s\\n' \"${COMPREPLY[@]}\" | sort | paste -sd ' '";
        return (await PeerTool.RunCheckedAsync("bash", ["-c", script])).StandardOutput.Trim();
    }

    internal static async Task WaitForAsync(Func<bool> condition, string what, TimeSpan? timeout = null)
    {
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(30));
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, $"timed out waiting for {what}");
            await Task.Delay(20);
        }
    }
}

/// <summary>scripts/install.sh run into a temporary prefix with the spindle executable under test.</summary>
internal sealed class Installation : IDisposable
{
    private readonly TempDirectory _directory = new();

    public string Prefix => _directory.File("usr");

    public string SysConfDir => _directory.File("etc");

    public string UnitDir => _directory.File("units");

    public string ManPath => System.IO.Path.Combine(Prefix, "share", "man");

    public string Binary => System.IO.Path.Combine(Prefix, "bin", "spindle");

    public string Completion => System.IO.Path.Combine(Prefix, "share", "bash-completion", "completions", "spindle");

    public string Unit(string name) => System.IO.Path.Combine(UnitDir, name);

    public static async Task<Installation> CreateAsync()
    {
        var installation = new Installation();
        var script = System.IO.Path.Combine(RepositoryRoot(), "scripts", "install.sh");
        // The executable under test when it is the native one (SPINDLE_CLI, as scripts/test.sh sets); else the script
        // builds it itself with ./spindle, as a user would.
        var arguments = new List<string> { script, "--prefix", installation.Prefix, "--sysconfdir", installation.SysConfDir, "--unitdir", installation.UnitDir };
        if (Environment.GetEnvironmentVariable("SPINDLE_CLI") is { Length: > 0 } native)
        {
            arguments.AddRange(["--binary", native]);
        }

        var result = await PeerTool.RunAsync("bash", arguments, TimeSpan.FromMinutes(10));
        Assert.True(result.ExitCode == 0, result.ToString());
        return installation;
    }

    /// <summary>The checkout the tests were built from (the folder with Spindle.slnx).</summary>
    public static string RepositoryRoot()
    {
        var directory = new DirectoryInfo(AppContext.BaseDirectory);
        while (directory is not null && !File.Exists(System.IO.Path.Combine(directory.FullName, "Spindle.slnx")))
        {
            directory = directory.Parent;
        }

        Assert.NotNull(directory);
        return directory.FullName;
    }

    public void Dispose() => _directory.Dispose();
}
