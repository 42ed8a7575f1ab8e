using System.Diagnostics;
using System.Net.Sockets;
using System.Text.RegularExpressions;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// The Debian 13 peers (scripts/trixie-root.sh) that speak NBD extended headers, proved against each other before
/// Spindle is proved against them: if these fail, the root is wrong, not Spindle.
/// </summary>
public sealed partial class TrixiePeerTests
{
    private const int ImageSize = 1 << 20;

    [Fact]
    public async Task Trixie_peers_are_new_enough_for_extended_headers()
    {
        // libnbd speaks NBD_OPT_EXTENDED_HEADERS from 1.18; nbdinfo prints its own and libnbd's version.
        var nbdinfo = await Trixie.RunCheckedAsync("nbdinfo", ["--version"]);
        var libnbd = LibnbdVersion().Match(nbdinfo.StandardOutput);
        Assert.True(libnbd.Success, nbdinfo.ToString());
        Assert.True(Version.Parse(libnbd.Groups[1].Value) >= new Version(1, 18), $"libnbd {libnbd.Groups[1].Value} is older than 1.18");

        // qemu speaks it from 8.2 (server and client).
        var qemuImg = await Trixie.RunCheckedAsync("qemu-img", ["--version"]);
        var qemu = QemuVersion().Match(qemuImg.StandardOutput);
        Assert.True(qemu.Success, qemuImg.ToString());
        Assert.True(Version.Parse(qemu.Groups[1].Value) >= new Version(8, 2), $"qemu {qemu.Groups[1].Value} is older than 8.2");
    }

    [Fact]
    public async Task Qemu_nbd_and_nbdsh_in_the_root_negotiate_extended_headers()
    {
        using var scratch = Trixie.CreateScratch();
        var original = Patterns.Generate(0, ImageSize);
        await File.WriteAllBytesAsync(scratch.HostPath("disk.raw"), original);
        var socket = scratch.RootPath("nbd.sock");

        var output = new List<string>();
        var server = Trixie.Start("qemu-nbd", ["--format=raw", "--socket=" + socket, "--persistent", scratch.RootPath("disk.raw")], line =>
        {
            lock (output)
            {
                output.Add(line);
            }
        });
        ProcessResult result;
        try
        {
            await WaitForSocketAsync(server, scratch.HostPath("nbd.sock"), output);
            var script = $"""
                h.set_request_extended_headers(True)
                h.connect_uri("nbd+unix:///?socket={socket}")
                print("extended", h.get_extended_headers_negotiated())
                print("read", h.pread(512, 4096).hex())
                h.pwrite(b"trixie" * 100, 65536)
                h.flush()
                print("readback", h.pread(600, 65536).hex())
                h.shutdown()
                """;
            result = await Trixie.RunCheckedAsync("nbdsh", ["-c", script], TimeSpan.FromSeconds(60));
        }
        finally
        {
            await PeerTool.StopAsync(server);
            server.Dispose();
        }

        var lines = result.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Contains("extended True", lines);
        Assert.Contains("read " + Convert.ToHexStringLower(original, 4096, 512), lines);
        var written = System.Text.Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("trixie", 100)));
        Assert.Contains("readback " + Convert.ToHexStringLower(written), lines);

        // The write went through qemu-nbd into the image, and nothing else changed.
        var image = await File.ReadAllBytesAsync(scratch.HostPath("disk.raw"));
        var expected = (byte[])original.Clone();
        written.CopyTo(expected, 65536);
        Assert.Equal(expected, image);
    }

    /// <summary>
    /// Waits (at most 30 s) until qemu-nbd accepts on its socket (the file appears at bind, before listen, so only a
    /// connection proves it), failing at once if the server died.
    /// </summary>
    private static async Task WaitForSocketAsync(Process server, string hostSocket, List<string> output)
    {
        var watch = Stopwatch.StartNew();
        while (true)
        {
            if (File.Exists(hostSocket))
            {
                using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await probe.ConnectAsync(new UnixDomainSocketEndPoint(hostSocket));
                    return;
                }
                catch (SocketException)
                {
                }
            }

            if (server.HasExited || watch.Elapsed > TimeSpan.FromSeconds(30))
            {
                lock (output)
                {
                    Assert.Fail($"qemu-nbd did not accept on {hostSocket} (exited: {server.HasExited}):\n{string.Join('\n', output)}");
                }
            }

            await Task.Delay(50);
        }
    }

    [GeneratedRegex(@"^libnbd (\d+\.\d+)", RegexOptions.Multiline | RegexOptions.CultureInvariant)]
    private static partial Regex LibnbdVersion();

    [GeneratedRegex(@"^qemu-img version (\d+\.\d+)", RegexOptions.Multiline | RegexOptions.CultureInvariant)]
    private static partial Regex QemuVersion();
}
