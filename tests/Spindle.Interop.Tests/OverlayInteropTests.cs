using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// The persistent overlay (<c>spindle serve --overlay PATH IMAGE</c>, issue 14) driven by real peers: qemu-io and
/// nbdcopy write through NBD, the writes survive a restart, the base never changes, and the overlay is an ordinary
/// qcow2 image to qemu: <c>qemu-img info</c> and <c>check</c>, <c>commit</c>, <c>rebase</c>, and qemu-nbd serving it.
/// </summary>
public sealed class OverlayInteropTests
{
    private const int Mi = 1024 * 1024;

    [Theory]
    [InlineData("raw")]
    [InlineData("qcow2")]
    public async Task Writes_survive_a_restart_and_qemu_img_commit_makes_the_base_what_clients_read(string baseFormat)
    {
        using var directory = new TempDirectory();
        var content = Patterns.Random(16 * Mi, seed: 11);
        var basePath = await CreateBase(directory, content, baseFormat);
        var before = Hash(basePath);
        var overlay = directory.File("overlay.qcow2");

        // First run, from the command line: the overlay is created, qemu-io writes through NBD.
        await using (var spindle = await Serve("--overlay", overlay, basePath))
        {
            using (var info = JsonDocument.Parse((await PeerTool.RunCheckedAsync("nbdinfo", ["--json", spindle.Uri!])).StandardOutput))
            {
                var export = info.RootElement.GetProperty("exports")[0];
                Assert.False(export.GetProperty("is_read_only").GetBoolean());
                Assert.Equal(16L * Mi, export.GetProperty("export-size").GetInt64());
            }

            await QemuIo(spindle.Uri!, "write -P 0x5a 1M 64k", "write -P 0x33 3000 5000", "write -z 8M 1M", "discard 12M 512k", "flush");
            Assert.Equal(0, await spindle.StopAsync());
        }

        Assert.Equal(before, Hash(basePath));
        using (var info = await QemuInfo(overlay))
        {
            Assert.Equal(Path.GetFileName(basePath), info.RootElement.GetProperty("backing-filename").GetString());
            Assert.Equal(basePath, info.RootElement.GetProperty("full-backing-filename").GetString());
            Assert.Equal(baseFormat, info.RootElement.GetProperty("backing-filename-format").GetString());
            Assert.Equal("1.1", info.RootElement.GetProperty("format-specific").GetProperty("data").GetProperty("compat").GetString());
        }

        await AssertCheckClean(overlay);

        // Second run, from a configuration file (overlay = PATH): the writes are still there.
        var config = directory.File("spindle.conf");
        await File.WriteAllTextAsync(config, $"""
            [generic]
                listenaddr = 127.0.0.1
                port = 0
            [disk]
                exportname = {basePath}
                overlay = {overlay}
            """);
        var served = directory.File("served.img");
        await using (var spindle = await SpindleProcess.StartAsync("serve", "--config", config, "--print-uri"))
        {
            await QemuIo(spindle.Uri!, "read -P 0x5a 1M 64k", "read -P 0x33 3000 5000", "read -P 0 8M 1M", "read -P 0 12M 512k");
            await PeerTool.RunCheckedAsync("nbdcopy", [spindle.Uri!, served]);
            Assert.Equal(0, await spindle.StopAsync());
        }

        var expected = (byte[])content.Clone();
        expected.AsSpan(Mi, 64 * 1024).Fill(0x5a);
        expected.AsSpan(3000, 5000).Fill(0x33);
        expected.AsSpan(8 * Mi, Mi).Clear();
        expected.AsSpan(12 * Mi, 512 * 1024).Clear();
        Assert.Equal(expected, await File.ReadAllBytesAsync(served));
        Assert.Equal(before, Hash(basePath));

        // qemu-img commit folds the overlay into the base: the base then reads as the clients read the export.
        await PeerTool.RunCheckedAsync("qemu-img", ["commit", "-f", "qcow2", overlay]);
        if (baseFormat == "raw")
        {
            await PeerTool.RunCheckedAsync("cmp", [served, basePath]);
        }
        else
        {
            await PeerTool.RunCheckedAsync("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", served, basePath]);
            await AssertCheckClean(basePath);
        }
    }

    [Fact]
    public async Task Qemu_nbd_reads_the_overlay_as_spindle_serves_it_and_rebase_keeps_its_contents()
    {
        using var directory = new TempDirectory();
        var content = Patterns.Random(16 * Mi, seed: 12);
        var basePath = await CreateBase(directory, content, "raw");
        var before = Hash(basePath);
        var overlay = directory.File("overlay.qcow2");

        // nbdcopy with four connections writes half a disk of data and half of zeroes into the overlay.
        var source = directory.File("source.img");
        var sourceBytes = new byte[16 * Mi];
        Patterns.Random(8 * Mi, seed: 13).CopyTo(sourceBytes, 0);
        await File.WriteAllBytesAsync(source, sourceBytes);
        var spindleCopy = directory.File("spindle.img");
        await using (var spindle = await Serve("--overlay", overlay, basePath))
        {
            await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", source, spindle.Uri!]);
            await QemuIo(spindle.Uri!, "write -P 0x7e 10M 100k");
            await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", spindle.Uri!, spindleCopy]);
            Assert.Equal(0, await spindle.StopAsync());
        }

        sourceBytes.AsSpan(10 * Mi, 100 * 1024).Fill(0x7e);
        Assert.Equal(sourceBytes, await File.ReadAllBytesAsync(spindleCopy));
        Assert.Equal(before, Hash(basePath));
        await AssertCheckClean(overlay);

        // qemu-nbd serving the same overlay reads the same bytes.
        Assert.Equal(sourceBytes, await CopyThroughQemuNbd(directory, overlay, "qemu.img"));

        // rebase -u onto a copy of the base: the overlay now belongs to the copy, and Spindle follows the header.
        var copy = directory.File("copy.img");
        File.Copy(basePath, copy);
        await PeerTool.RunCheckedAsync("qemu-img", ["rebase", "-u", "-f", "qcow2", "-b", "copy.img", "-F", "raw", overlay]);
        var refused = await SpindleProcess.RunAsync("serve", "--overlay", overlay, "--bind", "127.0.0.1", "--port", "0", basePath);
        Assert.NotEqual(0, refused.ExitCode);
        Assert.Contains("not of", refused.StandardError, StringComparison.Ordinal);
        var rebasedCopy = directory.File("rebased.img");
        await using (var spindle = await Serve("--overlay", overlay, copy))
        {
            await PeerTool.RunCheckedAsync("nbdcopy", [spindle.Uri!, rebasedCopy]);
            Assert.Equal(0, await spindle.StopAsync());
        }

        Assert.Equal(sourceBytes, await File.ReadAllBytesAsync(rebasedCopy));

        // rebase -b '' flattens it: no backing file any more, the same bytes, and no longer anyone's overlay.
        await PeerTool.RunCheckedAsync("qemu-img", ["rebase", "-f", "qcow2", "-b", string.Empty, overlay]);
        using (var info = await QemuInfo(overlay))
        {
            Assert.False(info.RootElement.TryGetProperty("backing-filename", out _));
        }

        await AssertCheckClean(overlay);
        Assert.Equal(sourceBytes, await CopyThroughQemuNbd(directory, overlay, "flat.img"));
        refused = await SpindleProcess.RunAsync("serve", "--overlay", overlay, "--bind", "127.0.0.1", "--port", "0", copy);
        Assert.NotEqual(0, refused.ExitCode);
        Assert.Contains("without a backing file", refused.StandardError, StringComparison.Ordinal);
        Assert.Equal(before, Hash(basePath));
    }

    [Fact]
    public async Task Overlays_that_cannot_work_are_refused_and_nothing_is_written()
    {
        using var directory = new TempDirectory();
        var basePath = await CreateBase(directory, Patterns.Random(4 * Mi, seed: 14), "raw");
        var otherPath = directory.File("other.img");
        File.Copy(basePath, otherPath);
        var before = Hash(basePath);
        var foreign = directory.File("foreign.qcow2");
        await PeerTool.RunCheckedAsync("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "other.img", "-F", "raw", foreign]);
        var foreignBefore = Hash(foreign);
        var data = directory.File("data.img");
        await File.WriteAllBytesAsync(data, Patterns.Random(65536, seed: 15));
        var dataBefore = Hash(data);
        var fresh = directory.File("fresh.qcow2");

        (string[] Arguments, string Message)[] cases =
        [
            (["--overlay", foreign, basePath], "not of"), // an overlay of another image
            (["--overlay", data, basePath], "not a qcow2 image"),
            (["--overlay", fresh, "--cow", basePath], "exclude each other"),
            (["--overlay", fresh, "--cow-per-connection", basePath], "exclude each other"),
            (["--overlay", fresh, "--partition", "1", basePath], "whole image"),
            (["--overlay", fresh, "--offset", "1M", basePath], "whole image"),
            (["--overlay", fresh, "--format", "qcow2", basePath], "not a qcow2 image"),
            (["--overlay", fresh, "-r", basePath], "does not exist"),
            (["--overlay", basePath, basePath], "same file"),
            (["--overlay", directory.File("no/such/dir/o.qcow2"), basePath], "does not exist"),
        ];
        foreach (var (arguments, message) in cases)
        {
            var result = await SpindleProcess.RunAsync(["serve", "--bind", "127.0.0.1", "--port", "0", .. arguments]);
            Assert.True(result.ExitCode != 0, $"{string.Join(' ', arguments)}: {result}");
            Assert.True(result.StandardError.Contains(message, StringComparison.Ordinal), $"{string.Join(' ', arguments)}: expected '{message}' in {result}");
        }

        Assert.False(File.Exists(fresh));
        Assert.Equal(before, Hash(basePath));
        Assert.Equal(foreignBefore, Hash(foreign));
        Assert.Equal(dataBefore, Hash(data));

        // A read-only export of an existing overlay is served read-only.
        await using (var spindle = await Serve("--overlay", foreign, otherPath))
        {
            await QemuIo(spindle.Uri!, "write -P 0x21 0 64k");
            Assert.Equal(0, await spindle.StopAsync());
        }

        await using (var spindle = await Serve("-r", "--overlay", foreign, otherPath))
        {
            using var info = JsonDocument.Parse((await PeerTool.RunCheckedAsync("nbdinfo", ["--json", spindle.Uri!])).StandardOutput);
            Assert.True(info.RootElement.GetProperty("exports")[0].GetProperty("is_read_only").GetBoolean());
            var read = await PeerTool.RunCheckedAsync("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x21 0 64k", spindle.Uri!]);
            Assert.DoesNotContain("failed", read.StandardOutput + read.StandardError, StringComparison.OrdinalIgnoreCase);
            Assert.Equal(0, await spindle.StopAsync());
        }

        Assert.Equal(before, Hash(otherPath));
    }

    [Fact]
    public async Task An_overlay_stacks_under_the_filters_and_keeps_flushed_writes_through_kill_9()
    {
        using var directory = new TempDirectory();
        var basePath = await CreateBase(directory, Patterns.Random(8 * Mi, seed: 16), "raw");
        var before = Hash(basePath);
        var overlay = directory.File("overlay.qcow2");
        var log = directory.File("requests.log");

        // qemu-io flushes before it disconnects: once it returns, the writes are on stable storage in the overlay.
        await using (var spindle = await Serve("--overlay", overlay, "--delay-write", "1", basePath))
        {
            await QemuIo(spindle.Uri!, "write -P 0x61 2M 128k", "write -P 0x62 5000 3000");
            Assert.Equal(137, await spindle.StopAsync(signal: 9)); // 128 + SIGKILL: no clean shutdown
        }

        var check = await PeerTool.RunAsync("qemu-img", ["check", "-f", "qcow2", overlay]);
        Assert.True(check.ExitCode is 0 or 3, check.ToString()); // leaked clusters at worst, never corruption
        await using (var spindle = await Serve("--overlay", overlay, "--log-requests", log, basePath))
        {
            await QemuIo(spindle.Uri!, "read -P 0x61 2M 128k", "read -P 0x62 5000 3000");
            Assert.Equal(0, await spindle.StopAsync());
        }

        Assert.Contains(File.ReadAllLines(log), line => line.Contains("READ", StringComparison.Ordinal) && line.Contains("2097152", StringComparison.Ordinal));
        Assert.Equal(before, Hash(basePath));
    }

    private static Task<SpindleProcess> Serve(params string[] arguments) =>
        SpindleProcess.StartAsync(["serve", "--bind", "127.0.0.1", "--port", "0", "--print-uri", .. arguments]);

    private static async Task<string> CreateBase(TempDirectory directory, byte[] content, string format)
    {
        var raw = directory.File(format == "raw" ? "base.img" : "content.raw");
        await File.WriteAllBytesAsync(raw, content);
        if (format == "raw")
        {
            return raw;
        }

        var qcow2 = directory.File("base.qcow2");
        await PeerTool.RunCheckedAsync("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, qcow2]);
        return qcow2;
    }

    private static async Task QemuIo(string uri, params string[] commands)
    {
        var arguments = new List<string> { "-f", "raw" };
        foreach (var command in commands)
        {
            arguments.Add("-c");
            arguments.Add(command);
        }

        arguments.Add(uri);
        var result = await PeerTool.RunCheckedAsync("qemu-io", arguments);
        Assert.DoesNotContain("failed", result.StandardOutput + result.StandardError, StringComparison.OrdinalIgnoreCase);
    }

    private static async Task<JsonDocument> QemuInfo(string image) =>
        JsonDocument.Parse((await PeerTool.RunCheckedAsync("qemu-img", ["info", "--output=json", "-f", "qcow2", image])).StandardOutput);

    private static async Task AssertCheckClean(string image)
    {
        var result = await PeerTool.RunAsync("qemu-img", ["check", "-f", "qcow2", image]);
        Assert.True(result.ExitCode == 0 && result.StandardOutput.Contains("No errors were found", StringComparison.Ordinal), result.ToString());
    }

    private static async Task<byte[]> CopyThroughQemuNbd(TempDirectory directory, string image, string name)
    {
        await using var server = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", image], unix: true);
        var copy = directory.File(name);
        await PeerTool.RunCheckedAsync("nbdcopy", [server.Uri(), copy]);
        return await File.ReadAllBytesAsync(copy);
    }

    private static string Hash(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexString(SHA256.HashData(stream));
    }
}
