using System.Diagnostics;
using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Rbd.Tests;

/// <summary>
/// Dirty bitmaps of RBD exports, kept in the image's metadata: qemu-io's changes read back by nbdinfo, the keys seen
/// by the rbd tool, the bitmap still there after a restart, and a hostile metadata value refused.
/// </summary>
public sealed class RbdBitmapTests(CephCluster cluster)
{
    private const int Ki = 1024;
    private const int Mi = 1024 * 1024;

    [Fact(Timeout = 180_000)]
    public async Task An_rbd_bitmap_maps_qemu_io_changes_survives_a_restart_and_lives_in_image_metadata()
    {
        var image = await cluster.CreateImageAsync("bitmap");
        using var directory = new TempDirectory();
        var socket = directory.File("nbd.sock");
        var uri = $"nbd+unix:///?socket={socket}";
        string[] rbd = [$"rbd:{image}", "--rbd-conf", cluster.ConfigFile, "--rbd-id", "admin", "--rbd-keyring", cluster.Keyring, "--unix", socket];
        using (var server = await StartAsync(socket, [.. rbd, "--bitmap", "r", "--bitmap-granularity", "128K"]))
        {
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x31 1M 4k", "-c", "write -z 10M 1M", "-c", "discard 20M 64k", "-c", "write 63M 1", uri], TimeSpan.FromSeconds(120));
            Assert.Equal("1048576+131072 10485760+1048576 20971520+131072 66060288+131072", await DirtyAsync(uri, "r"));
            await server.StopAsync();
        }

        var meta = await cluster.RbdAsync("image-meta", "list", image);
        Assert.Contains("spindle-bitmap.r ", meta.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("spindle-bitmap.r.0", meta.StandardOutput, StringComparison.Ordinal);
        var header = await cluster.RbdAsync("image-meta", "get", image, "spindle-bitmap.r");
        Assert.Equal($"v1 131072 {64 * Mi}", header.StandardOutput.Trim());

        using (var again = await StartAsync(socket, [.. rbd, "-r", "--bitmap", "r"]))
        {
            Assert.Equal("1048576+131072 10485760+1048576 20971520+131072 66060288+131072", await DirtyAsync(uri, "r"));
            await again.StopAsync();
        }

        // Hostile values: a header that is not ours, a page that is not a page. Both refused at start, with the key.
        await cluster.RbdAsync("image-meta", "set", image, "spindle-bitmap.h", "v1 1000 5");
        var header1 = await PeerTool.RunAsync(SpindleExecutable.Path, ["serve", .. rbd, "--bitmap", "h"], TimeSpan.FromSeconds(120));
        Assert.Equal(1, header1.ExitCode);
        Assert.Contains("spindle-bitmap.h", header1.StandardError, StringComparison.Ordinal);
        await cluster.RbdAsync("image-meta", "set", image, "spindle-bitmap.r.0", "not base64!");
        var page = await PeerTool.RunAsync(SpindleExecutable.Path, ["serve", .. rbd, "--bitmap", "r"], TimeSpan.FromSeconds(120));
        Assert.Equal(1, page.ExitCode);
        Assert.Contains("not a base64 page", page.StandardError, StringComparison.Ordinal);
    }

    /// <summary>The dirty runs nbdinfo maps, as "OFFSET+LENGTH ...".</summary>
    private static async Task<string> DirtyAsync(string uri, string name)
    {
        var map = await PeerTool.RunCheckedAsync("nbdinfo", [$"--map=qemu:dirty-bitmap:{name}", uri], TimeSpan.FromSeconds(120));
        return string.Join(' ', map.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Where(words => words.Length >= 3 && words[2] == "1")
            .Select(words => string.Create(CultureInfo.InvariantCulture, $"{words[0]}+{words[1]}")));
    }

    private static async Task<Server> StartAsync(string socket, string[] arguments)
    {
        var process = PeerTool.Start(SpindleExecutable.Path, ["serve", .. arguments]);
        var watch = Stopwatch.StartNew();
        while (!File.Exists(socket))
        {
            if (process.HasExited || watch.Elapsed > TimeSpan.FromSeconds(60))
            {
                await PeerTool.StopAsync(process, TimeSpan.FromSeconds(30));
                Assert.Fail($"spindle serve {string.Join(' ', arguments)} did not start listening (exit {(process.HasExited ? process.ExitCode : -1)})");
            }

            await Task.Delay(50, TestContext.Current.CancellationToken);
        }

        return new Server(process);
    }

    private sealed class Server(Process process) : IDisposable
    {
        public async Task StopAsync()
        {
            await PeerTool.StopAsync(process, TimeSpan.FromSeconds(30));
            Assert.Equal(0, process.ExitCode);
        }

        public void Dispose()
        {
            if (!process.HasExited)
            {
                process.Kill();
                process.WaitForExit(10_000);
            }

            process.Dispose();
        }
    }
}
