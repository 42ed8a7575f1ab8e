using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// Layers on an export (issue 14) driven by real peers: qemu-io and nbdcopy through copy-on-write overlays on a base
/// that must not change, libnbd connections side by side on per-connection overlays, and partitions of disks made
/// by sgdisk and parted compared with dd's copy of the same bytes.
/// </summary>
public sealed class LayerInteropTests
{
    private const int Mi = 1024 * 1024;

    [Fact]
    public async Task Cow_overlay_takes_qemu_io_and_nbdcopy_writes_and_never_changes_the_base()
    {
        using var directory = new TempDirectory();
        var overlays = Directory.CreateDirectory(directory.File("overlays")).FullName;
        var content = Patterns.Random(16 * Mi, seed: 3);
        var image = directory.File("base.img");
        await File.WriteAllBytesAsync(image, content);
        var before = Hash(image);

        await using var spindle = await SpindleProcess.StartAsync("serve", "--cow", "--cow-dir", overlays, "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        var uri = spindle.Uri!;
        var info = await PeerTool.RunCheckedAsync("nbdinfo", ["--json", uri]);
        using (var json = JsonDocument.Parse(info.StandardOutput))
        {
            var export = json.RootElement.GetProperty("exports")[0];
            Assert.False(export.GetProperty("is_read_only").GetBoolean());
            Assert.True(export.GetProperty("can_multi_conn").GetBoolean()); // one overlay: a FLUSH covers every connection
        }

        // One qemu-io connection writes (aligned, unaligned, zeroes, discard); a second one reads all of it back.
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x33 3000 5000", "-c", "write -z 8M 1M", "-c", "discard 12M 512k", uri]);
        var read = await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0x33 3000 5000", "-c", "read -P 0 8M 1M", "-c", "read -P 0 12M 512k", uri]);
        Assert.DoesNotContain("Pattern verification failed", read.StandardOutput + read.StandardError, StringComparison.Ordinal);
        var expected = (byte[])content.Clone();
        expected.AsSpan(Mi, 64 * 1024).Fill(0x5a);
        expected.AsSpan(3000, 5000).Fill(0x33);
        expected.AsSpan(8 * Mi, Mi).Clear();
        expected.AsSpan(12 * Mi, 512 * 1024).Clear();

        // nbdcopy reads the combination exactly, then writes a whole new disk through the overlay.
        var copy = directory.File("copy.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [uri, copy]);
        Assert.Equal(expected, await File.ReadAllBytesAsync(copy));
        var other = directory.File("other.img");
        await File.WriteAllBytesAsync(other, Patterns.Random(16 * Mi, seed: 4));
        await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", other, uri]);
        await PeerTool.RunCheckedAsync("nbdcopy", [uri, copy]);
        Assert.Equal(await File.ReadAllBytesAsync(other), await File.ReadAllBytesAsync(copy));

        Assert.Equal(before, Hash(image));
        Assert.Empty(Directory.GetFiles(overlays)); // the overlay file is unlinked from the start
        Assert.Equal(0, await spindle.StopAsync());
        Assert.Equal(before, Hash(image));
    }

    [Fact]
    public async Task Copyonwrite_in_an_nbd_server_configuration_gives_each_connection_its_own_overlay()
    {
        using var directory = new TempDirectory();
        var content = Patterns.Random(4 * Mi, seed: 5);
        var image = directory.File("golden.img");
        await File.WriteAllBytesAsync(image, content);
        var before = Hash(image);
        var config = directory.File("config");
        await File.WriteAllTextAsync(config, $"""
            [generic]
                listenaddr = 127.0.0.1
                port = 0
            [golden]
                exportname = {image}
                copyonwrite = true
                cowdir = {directory.Path}
                sparse_cow = true
            """);
        await using var spindle = await SpindleProcess.StartAsync("serve", "--config", config, "--print-uri");
        var uri = spindle.Uri!; // the first (only) export: nbd://127.0.0.1:PORT/golden

        // Two connections at once: each sees its own writes and the base where it wrote nothing; neither sees the
        // other's. A third connection after they closed sees the base again. No multi-conn: they do not share data.
        var script = """
            import sys, nbd
            uri = sys.argv[1]
            base = open(sys.argv[2], "rb").read()
            a, b = nbd.NBD(), nbd.NBD()
            a.connect_uri(uri); b.connect_uri(uri)
            assert not a.is_read_only() and not a.can_multi_conn()
            a.pwrite(b"A" * 10000, 5000)
            b.pwrite(b"B" * 4096, 8192)
            b.zero(65536, 1 << 20)
            assert a.pread(10000, 5000) == b"A" * 10000
            assert a.pread(4096, 1 << 20) == base[1 << 20:(1 << 20) + 4096]
            assert b.pread(4096, 8192) == b"B" * 4096
            assert b.pread(5000, 0) == base[:5000]
            assert b.pread(4096, 1 << 20) == bytes(4096)
            a.flush(); a.shutdown(); b.shutdown()
            c = nbd.NBD(); c.connect_uri(uri)
            assert c.pread(len(base), 0) == base
            c.shutdown()
            print("OK")
            """;
        var result = await PeerTool.RunPythonAsync(script, [uri, image]);
        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal("OK", result.StandardOutput.Trim());

        // qemu-io's writes are gone once it disconnects.
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 1M", uri]);
        var copy = directory.File("copy.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [uri, copy]);
        Assert.Equal(content, await File.ReadAllBytesAsync(copy));
        Assert.Equal(0, await spindle.StopAsync());
        Assert.Equal(before, Hash(image));
        Assert.Equal(["config", "copy.img", "golden.img"], Directory.GetFiles(directory.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    [Fact]
    public async Task A_gpt_partition_made_by_sgdisk_is_byte_identical_to_dd_and_bounded()
    {
        using var directory = new TempDirectory();
        var image = await GptDiskAsync(directory);
        await using var spindle = await SpindleProcess.StartAsync("serve", "--partition", "2", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        var copy = directory.File("served.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [spindle.Uri!, copy]);
        var dd = directory.File("dd.img");
        await PeerTool.RunCheckedAsync("dd", [$"if={image}", $"of={dd}", "bs=512", "skip=18432", "count=32768", "status=none"]);
        Assert.Equal(16 * Mi, new FileInfo(copy).Length);
        Assert.Equal(await File.ReadAllBytesAsync(dd), await File.ReadAllBytesAsync(copy));
        Assert.Equal(0, await spindle.StopAsync());
    }

    [Fact]
    public async Task Partitions_and_ranges_refuse_out_of_range_requests_with_the_usual_errors()
    {
        using var directory = new TempDirectory();
        var image = await GptDiskAsync(directory);
        var before = await File.ReadAllBytesAsync(image);
        var config = directory.File("config");
        await File.WriteAllTextAsync(config, $"""
            [generic]
                listenaddr = 127.0.0.1
                port = 0
            [part]
                exportname = {image}
                partition = 1
            [ro]
                exportname = {image}
                offset = 2M
                length = 4M
                readonly = true
            [range]
                exportname = {image}
                offset = 9M
                length = 4M
            """);
        await using var spindle = await SpindleProcess.StartAsync("serve", "--config", config, "--print-uri");
        var root = spindle.Uri!.Split('/')[..3];
        string Uri(string name) => string.Join('/', root) + "/" + name;
        var errors = Path.Combine(AppContext.BaseDirectory, "python", "errors.py");
        var result = await PeerTool.RunAsync(PeerTool.SystemPython, [errors, Uri("part"), Uri("ro"), (8 * Mi).ToString(CultureInfo.InvariantCulture)]);
        Assert.True(result.ExitCode == 0, result.ToString());
        result = await PeerTool.RunAsync(PeerTool.SystemPython, [errors, Uri("range"), Uri("ro"), (4 * Mi).ToString(CultureInfo.InvariantCulture)]);
        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal(0, await spindle.StopAsync());

        // errors.py writes 4 KiB of 'z' at offset 0 of each writable export: exactly there, nowhere else.
        var after = await File.ReadAllBytesAsync(image);
        var expected = (byte[])before.Clone();
        expected.AsSpan(2048 * 512, 4096).Fill((byte)'z');
        expected.AsSpan(9 * Mi, 4096).Fill((byte)'z');
        Assert.True(expected.AsSpan().SequenceEqual(after), "bytes outside the written 4 KiB changed");
    }

    [Fact]
    public async Task An_mbr_partition_made_by_parted_matches_dd()
    {
        using var directory = new TempDirectory();
        var image = directory.File("mbr.img");
        await File.WriteAllBytesAsync(image, Patterns.Random(24 * Mi, seed: 9));
        await PeerTool.RunCheckedAsync("parted", ["-s", image, "mklabel", "msdos", "mkpart", "primary", "1MiB", "9MiB", "mkpart", "primary", "9MiB", "20MiB"]);
        await using var spindle = await SpindleProcess.StartAsync("serve", "--partition", "2", "-r", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        var copy = directory.File("served.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [spindle.Uri!, copy]);
        var dd = directory.File("dd.img");
        await PeerTool.RunCheckedAsync("dd", [$"if={image}", $"of={dd}", "bs=1M", "skip=9", "count=11", "status=none"]);
        Assert.Equal(11 * Mi, new FileInfo(copy).Length);
        Assert.Equal(await File.ReadAllBytesAsync(dd), await File.ReadAllBytesAsync(copy));
        Assert.Equal(0, await spindle.StopAsync());
    }

    [Fact]
    public async Task An_overlay_over_a_partition_writes_neither_the_partition_nor_the_disk()
    {
        using var directory = new TempDirectory();
        var image = await GptDiskAsync(directory);
        var before = Hash(image);
        await using var spindle = await SpindleProcess.StartAsync("serve", "--partition", "2", "--cow", "--cow-dir", directory.Path, "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        var uri = spindle.Uri!;
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x6b 0 1M", "-c", "discard 15M 1M", uri]);
        var copy = directory.File("served.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [uri, copy]);
        var dd = directory.File("dd.img");
        await PeerTool.RunCheckedAsync("dd", [$"if={image}", $"of={dd}", "bs=512", "skip=18432", "count=32768", "status=none"]);
        var expected = await File.ReadAllBytesAsync(dd);
        expected.AsSpan(0, Mi).Fill(0x6b);
        expected.AsSpan(15 * Mi, Mi).Clear();
        Assert.Equal(expected, await File.ReadAllBytesAsync(copy));
        Assert.Equal(0, await spindle.StopAsync());
        Assert.Equal(before, Hash(image));
    }

    /// <summary>A 32 MiB disk of random bytes with a GPT by sgdisk: partition 1 at sector 2048 (8 MiB), 2 at 18432 (16 MiB).</summary>
    private static async Task<string> GptDiskAsync(TempDirectory directory)
    {
        var image = directory.File("gpt.img");
        await File.WriteAllBytesAsync(image, Patterns.Random(32 * Mi, seed: 11));
        await PeerTool.RunCheckedAsync("sgdisk", ["-o", "-n", "1:2048:+8M", "-n", "2:18432:+16M", image]);
        return image;
    }

    private static string Hash(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexString(SHA256.HashData(stream));
    }
}
