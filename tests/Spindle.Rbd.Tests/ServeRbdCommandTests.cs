using System.Diagnostics;
using System.Text;
using Spindle.Testing;
using Xunit;

namespace Spindle.Rbd.Tests;

/// <summary>The real <c>spindle serve</c> binary on RBD images: the command line, configuration files, and its errors.</summary>
public sealed class ServeRbdCommandTests(CephCluster cluster)
{
    private static readonly TimeSpan PeerTimeout = TimeSpan.FromSeconds(120);

    private static string Spindle => SpindleExecutable.Path;

    [Fact(Timeout = 120_000)]
    public async Task Spindle_serve_rbd_image_serves_it_and_stops_cleanly()
    {
        var image = await cluster.CreateImageAsync("cli");
        using var directory = new TempDirectory();
        var socket = directory.File("nbd.sock");
        await using (var server = await StartAsync(socket, $"rbd:{image}", "--rbd-conf", cluster.ConfigFile, "--rbd-id", "admin", "--rbd-keyring", cluster.Keyring, "--unix", socket))
        {
            var uri = $"nbd+unix:///?socket={socket}";
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", uri, "-c", "write -P 0x4e 1M 1M", "-c", "flush"], PeerTimeout);
            var info = await PeerTool.RunCheckedAsync("nbdinfo", [uri], PeerTimeout);
            Assert.Contains("can_multi_conn: true", info.StandardOutput, StringComparison.Ordinal);
            Assert.Equal(0, await server.StopAsync());
            Assert.Contains($"rbd {image}", server.Output, StringComparison.Ordinal);
        }

        var exported = await cluster.ExportAsync(image);
        Assert.True(exported.AsSpan(1 << 20, 1 << 20).IndexOfAnyExcept((byte)0x4e) < 0);
    }

    [Fact(Timeout = 120_000)]
    public async Task Qemu_style_inline_options_work_on_the_command_line()
    {
        var image = await cluster.CreateImageAsync("inline");
        using var directory = new TempDirectory();
        var socket = directory.File("nbd.sock");
        await using var server = await StartAsync(socket, $"rbd:{image}:conf={cluster.ConfigFile}:keyring={cluster.Keyring}:id=admin", "-r", "--unix", socket);
        var check = await PeerTool.RunAsync("nbdinfo", ["--is=read-only", $"nbd+unix:///?socket={socket}"], PeerTimeout);
        Assert.True(check.ExitCode == 0, check.ToString());
    }

    [Fact(Timeout = 120_000)]
    public async Task A_configuration_file_serves_an_image_and_its_snapshot()
    {
        var image = await cluster.CreateImageAsync("conf");
        await cluster.RbdAsync("snap", "create", image + "@gold");
        using var directory = new TempDirectory();
        var socket = directory.File("nbd.sock");
        var config = directory.File("spindle.conf");
        await File.WriteAllTextAsync(config, $"""
            [generic]
                unixsock = {socket}
            [vm]
                conf = {cluster.ConfigFile}
                keyring = {cluster.Keyring}
                exportname = rbd:{image}
            [gold]
                exportname = rbd:{image}@gold
                conf = {cluster.ConfigFile}
                keyring = {cluster.Keyring}
            """, TestContext.Current.CancellationToken);

        await using var server = await StartAsync(socket, "--config", config);
        var list = await PeerTool.RunCheckedAsync("nbdinfo", ["--list", $"nbd+unix:///?socket={socket}"], PeerTimeout);
        Assert.Contains("export=\"vm\"", list.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("export=\"gold\"", list.StandardOutput, StringComparison.Ordinal);
        var gold = await PeerTool.RunAsync("nbdinfo", ["--is=read-only", $"nbd+unix:///gold?socket={socket}"], PeerTimeout);
        Assert.True(gold.ExitCode == 0, $"a snapshot export is read-only: {gold}");
        var vm = await PeerTool.RunAsync("nbdinfo", ["--is=read-only", $"nbd+unix:///vm?socket={socket}"], PeerTimeout);
        Assert.True(vm.ExitCode == 2, $"the image itself is writable: {vm}");
    }

    [Fact(Timeout = 120_000)]
    public async Task A_missing_image_fails_the_start_with_a_clear_error()
    {
        var result = await PeerTool.RunAsync(Spindle, ["serve", "rbd:rbd/absent", "--rbd-conf", cluster.ConfigFile, "--rbd-keyring", cluster.Keyring, "--bind", "127.0.0.1", "--port", "0"], PeerTimeout);
        Assert.Equal(1, result.ExitCode);
        Assert.Contains("spindle: error: rbd:rbd/absent: image rbd/absent does not exist", result.StandardError, StringComparison.Ordinal);
        Assert.DoesNotContain("Unhandled exception", result.StandardError, StringComparison.Ordinal);
    }

    [Fact(Timeout = 120_000)]
    public async Task A_wrong_key_fails_the_start_with_a_clear_error()
    {
        var image = await cluster.CreateImageAsync("cliwrongkey");
        using var directory = new TempDirectory();
        var keyring = directory.File("wrong.keyring");
        var key = await PeerTool.RunCheckedAsync("ceph-authtool", ["--gen-print-key"]);
        await File.WriteAllTextAsync(keyring, $"[client.admin]\n\tkey = {key.StandardOutput.Trim()}\n", TestContext.Current.CancellationToken);

        var result = await PeerTool.RunAsync(Spindle, ["serve", $"rbd:{image}", "--rbd-conf", cluster.ConfigFile, "--rbd-keyring", keyring, "--bind", "127.0.0.1", "--port", "0"], PeerTimeout);
        Assert.Equal(1, result.ExitCode);
        Assert.Contains("the cluster refused client.admin: the key in " + keyring + " is wrong", result.StandardError, StringComparison.Ordinal);
        Assert.DoesNotContain("Unhandled exception", result.StandardError, StringComparison.Ordinal);
    }

    [Fact(Timeout = 120_000)]
    public async Task A_missing_librbd_fails_the_start_with_a_clear_error()
    {
        // A private mount namespace hides librbd.so.1 (an empty file over it) from this one process.
        var path = new[] { "/usr/lib/x86_64-linux-gnu/librbd.so.1", "/usr/lib/aarch64-linux-gnu/librbd.so.1" }.FirstOrDefault(File.Exists);
        Assert.True(path is not null, "librbd.so.1 is not installed: run scripts/install-deps.sh");
        var result = await PeerTool.RunAsync("unshare", ["--mount", "--propagation", "private", "sh", "-c", "mount --bind /dev/null \"$1\" && shift && exec \"$@\"", "sh", path,
            Spindle, "serve", "rbd:rbd/whatever", "--rbd-conf", cluster.ConfigFile, "--bind", "127.0.0.1", "--port", "0"], PeerTimeout);
        Assert.True(result.ExitCode == 1, result.ToString());
        Assert.Contains("librbd.so.1 could not be loaded: install Ceph's client library (Debian/Ubuntu: apt install librbd1)", result.StandardError, StringComparison.Ordinal);
        Assert.DoesNotContain("Unhandled exception", result.StandardError, StringComparison.Ordinal);
    }

    /// <summary>Starts spindle serve and waits (bounded) for its Unix socket.</summary>
    internal static async Task<RunningServer> StartAsync(string socket, params string[] arguments)
    {
        var output = new StringBuilder();
        var process = PeerTool.Start(Spindle, new[] { "serve" }.Concat(arguments), onOutput: line =>
        {
            lock (output)
            {
                output.AppendLine(line);
            }
        });
        var server = new RunningServer(process, output);
        var watch = Stopwatch.StartNew();
        while (!File.Exists(socket))
        {
            if (process.HasExited || watch.Elapsed > TimeSpan.FromSeconds(60))
            {
                await server.DisposeAsync();
                Assert.Fail($"spindle serve {string.Join(' ', arguments)} did not start listening: {server.Output}");
            }

            await Task.Delay(50, TestContext.Current.CancellationToken);
        }

        return server;
    }

    internal sealed class RunningServer(Process process, StringBuilder output) : IAsyncDisposable
    {
        public string Output
        {
            get
            {
                lock (output)
                {
                    return output.ToString();
                }
            }
        }

        /// <summary>SIGTERM, as a service manager stops it; returns the exit code.</summary>
        public async Task<int> StopAsync()
        {
            await PeerTool.StopAsync(process, TimeSpan.FromSeconds(30));
            return process.ExitCode;
        }

        public async ValueTask DisposeAsync()
        {
            await PeerTool.StopAsync(process, TimeSpan.FromSeconds(30));
            process.Dispose();
        }
    }
}
