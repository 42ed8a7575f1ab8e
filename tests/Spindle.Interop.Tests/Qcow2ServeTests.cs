using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// <c>spindle serve disk.qcow2</c> as qemu-nbd users expect it: the format detected or given, per export in a
/// configuration file, internal snapshots as <c>FILE@SNAPSHOT</c>, the backend's warnings logged, broken images
/// refused at start, qemu's image locks honoured, directory exports and <c>spindle copy</c> reading qcow2.
/// </summary>
public sealed class Qcow2ServeTests
{
    private const long Size = 64L << 20;

    [Fact]
    public async Task A_qcow2_file_is_detected_and_served_as_its_virtual_disk()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x5a 1M 3M", "write -z 8M 1M");
        await using var spindle = await Qcow2Peers.Serve(image);

        var info = await Qcow2Peers.Output("nbdinfo", "--json", spindle.Uri!);
        using (var json = JsonDocument.Parse(info))
        {
            var export = json.RootElement.GetProperty("exports")[0];
            Assert.Equal(Size, export.GetProperty("export-size").GetInt64());
            Assert.True(export.GetProperty("can_multi_conn").GetBoolean());
            var contexts = export.GetProperty("contexts").EnumerateArray().Select(c => c.GetString()).ToList();
            Assert.Contains("base:allocation", contexts);
            Assert.Contains("qemu:allocation-depth", contexts);
        }

        Assert.Contains(spindle.Output, line => line.Contains("Opened qcow2 ", StringComparison.Ordinal) && line.Contains("65536-byte clusters", StringComparison.Ordinal));

        // Writes through Spindle, read back by qemu from the file once Spindle has stopped.
        await Qcow2Peers.Io(spindle.Uri!, "raw", "write -P 0x77 2M 64k", "read -P 0x5a 1M 1M", "read -P 0 8M 1M");
        Assert.True(await Qcow2Peers.Same(spindle.Uri!, "raw", image, "qcow2"));
        Assert.Equal(0, await spindle.StopAsync());
        await Qcow2Peers.Io(image, "qcow2", "read -P 0x5a 1M 1M", "read -P 0x77 2M 64k", "read -P 0x5a 2112k 1984k");
        await Qcow2Peers.AssertClean(image, allowLeaks: false);
    }

    [Fact]
    public async Task Format_raw_serves_the_file_bytes_and_format_qcow2_refuses_a_raw_file()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await using (var spindle = await Qcow2Peers.Serve("--format", "raw", "-r", image))
        {
            var size = long.Parse((await Qcow2Peers.Output("nbdinfo", "--size", spindle.Uri!)).Trim(), System.Globalization.CultureInfo.InvariantCulture);
            Assert.Equal(new FileInfo(image).Length, size);
            Assert.True(await Qcow2Peers.Same(spindle.Uri!, "raw", image, "raw"));
        }

        var raw = directory.CreateSparseFile("plain.img", 1 << 20);
        var refused = await SpindleProcess.RunAsync("serve", "--format", "qcow2", raw);
        Assert.NotEqual(0, refused.ExitCode);
        Assert.Contains("cannot open", refused.StandardError, StringComparison.Ordinal);
        Assert.Contains("not a qcow2 image", refused.StandardError, StringComparison.Ordinal);

        var typo = await SpindleProcess.RunAsync("serve", "--format", "vmdk", raw);
        Assert.Equal(2, typo.ExitCode);
        Assert.Contains("raw, qcow2 or auto", typo.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task An_internal_snapshot_is_served_read_only_as_file_at_snapshot()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x11 0 4M");
        await Qcow2Peers.Img("snapshot", "-c", "before", image);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x22 1M 1M");
        var expected = directory.File("before.raw");
        await Qcow2Peers.Img("convert", "-l", "before", "-O", "raw", image, expected);

        await using (var spindle = await Qcow2Peers.Serve(image + "@before"))
        {
            Assert.Contains("is_read_only: true", await Qcow2Peers.Output("nbdinfo", spindle.Uri!), StringComparison.Ordinal);
            Assert.True(await Qcow2Peers.Same(spindle.Uri!, "raw", expected, "raw"));
            Assert.False(await Qcow2Peers.Same(spindle.Uri!, "raw", image, "qcow2"));
            var write = await PeerTool.RunAsync("qemu-io", ["-f", "raw", "-c", "write 0 4k", spindle.Uri!]);
            Assert.True(write.ExitCode != 0 || (write.StandardOutput + write.StandardError).Contains("failed", StringComparison.Ordinal), write.ToString());
        }

        // A missing snapshot names the ones there are.
        var missing = await SpindleProcess.RunAsync("serve", image + "@after");
        Assert.NotEqual(0, missing.ExitCode);
        Assert.Contains("no snapshot with id or name 'after'", missing.StandardError, StringComparison.Ordinal);
        Assert.Contains("'before'", missing.StandardError, StringComparison.Ordinal);

        // A file whose name really contains '@' is served as itself: the suffix is only read when that name does not exist.
        var odd = directory.CreateSparseFile("disk@2024.img", 3 << 20);
        await using (var spindle = await Qcow2Peers.Serve("-r", odd))
        {
            Assert.Equal("3145728", (await Qcow2Peers.Output("nbdinfo", "--size", spindle.Uri!)).Trim());
        }

        // And a raw file before the '@' is no snapshot either.
        var plain = directory.CreateSparseFile("plain.img", 1 << 20);
        var notQcow2 = await SpindleProcess.RunAsync("serve", plain + "@before");
        Assert.NotEqual(0, notQcow2.ExitCode);
        Assert.Contains("does not exist", notQcow2.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_configuration_file_sets_format_and_snapshot_per_export()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x33 0 1M");
        await Qcow2Peers.Img("snapshot", "-c", "s1", image);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x44 0 1M");
        var config = directory.File("config");
        await File.WriteAllTextAsync(config, $"""
            [generic]
                listenaddr = 127.0.0.1
                port = 0

            [active]
                exportname = {image}
                readonly = true

            [bytes]
                exportname = {image}
                format = raw
                readonly = true

            [old]
                exportname = {image}
                snapshot = s1
            """);
        await using (var spindle = await SpindleProcess.StartAsync("serve", "--config", config, "--print-uri"))
        {
            var server = spindle.Uri![..spindle.Uri!.LastIndexOf('/')];
            await Qcow2Peers.Read(server + "/active", "raw", "read -P 0x44 0 1M");
            await Qcow2Peers.Read(server + "/old", "raw", "read -P 0x33 0 1M");
            Assert.Equal(new FileInfo(image).Length.ToString(System.Globalization.CultureInfo.InvariantCulture), (await Qcow2Peers.Output("nbdinfo", "--size", server + "/bytes")).Trim());
            Assert.Contains("is_read_only: true", await Qcow2Peers.Output("nbdinfo", server + "/old"), StringComparison.Ordinal);
        }

        await File.WriteAllTextAsync(config, $"""
            [bad]
                exportname = {image}
                format = qcow3
            """);
        var refused = await SpindleProcess.RunAsync("serve", "--config", config);
        Assert.Equal(2, refused.ExitCode);
        Assert.Contains($"{config}:3", refused.StandardError, StringComparison.Ordinal);
        Assert.Contains("raw, qcow2 or auto", refused.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Broken_images_are_refused_at_start_with_a_clear_message()
    {
        using var directory = new TempDirectory();
        var good = await Qcow2Peers.Create(directory, "good.qcow2", "cluster_size=65536", Size);

        var truncated = directory.File("truncated.qcow2");
        await File.WriteAllBytesAsync(truncated, (await File.ReadAllBytesAsync(good))[..50]);

        // Incompatible feature bit 60, which no qemu knows (header byte 72 holds bits 56-63).
        var unknownFeature = directory.File("future.qcow2");
        var bytes = await File.ReadAllBytesAsync(good);
        bytes[72] |= 0x10;
        await File.WriteAllBytesAsync(unknownFeature, bytes);

        // An L1 table offset past the end of the file.
        var pastEnd = directory.File("pastend.qcow2");
        bytes = await File.ReadAllBytesAsync(good);
        bytes[40] = 0x7f;
        await File.WriteAllBytesAsync(pastEnd, bytes);

        // A backing chain that loops.
        var a = await Qcow2Peers.Create(directory, "a.qcow2", "cluster_size=65536", 1 << 20);
        await Qcow2Peers.Create(directory, "b.qcow2", "cluster_size=65536", 1 << 20, "-b", "a.qcow2", "-F", "qcow2");
        await Qcow2Peers.Img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a);

        foreach (var (file, words) in new[] { (truncated, "too short"), (unknownFeature, "unknown incompatible features"), (pastEnd, "L1 table"), (a, "loops") })
        {
            var result = await SpindleProcess.RunAsync("serve", "--bind", "127.0.0.1", "--port", "0", file);
            Assert.True(result.ExitCode == 1, $"{file}: {result}");
            Assert.Contains($"cannot open '{file}' as qcow2", result.StandardError, StringComparison.Ordinal);
            Assert.Contains(words, result.StandardError, StringComparison.Ordinal);
            Assert.DoesNotContain("Unhandled", result.StandardError, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task A_bitmap_left_in_use_by_a_killed_server_is_logged_as_a_warning_at_the_next_start()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await Qcow2Peers.Img("bitmap", "--add", image, "backup");
        await using (var spindle = await Qcow2Peers.Serve(image))
        {
            Assert.Contains("qemu:dirty-bitmap:backup", await Qcow2Peers.Output("nbdinfo", spindle.Uri!), StringComparison.Ordinal);
            await Qcow2Peers.Io(spindle.Uri!, "raw", "write -P 1 0 64k");
            PeerTool.Signal(spindle.Process, 9);
            await spindle.Process.WaitForExitAsync(TestContext.Current.CancellationToken);
        }

        await using (var spindle = await Qcow2Peers.Serve("-r", image))
        {
            var warning = await spindle.WaitForLineAsync(line => line.Contains("warn", StringComparison.Ordinal), TimeSpan.FromSeconds(10));
            Assert.Contains("bitmap 'backup' is inconsistent", warning, StringComparison.Ordinal);
            Assert.DoesNotContain("qemu:dirty-bitmap:backup", await Qcow2Peers.Output("nbdinfo", spindle.Uri!), StringComparison.Ordinal);
        }

        await Qcow2Peers.AssertClean(image);
    }

    [Fact]
    public async Task Qemu_and_spindle_honour_each_others_image_locks()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await using (var spindle = await Qcow2Peers.Serve(image))
        {
            var info = await PeerTool.RunAsync("qemu-img", ["info", image]);
            Assert.NotEqual(0, info.ExitCode);
            Assert.Contains("Failed to get shared \"write\" lock", info.StandardError, StringComparison.Ordinal);
            await PeerTool.RunCheckedAsync("qemu-img", ["info", "-U", image]);

            var second = await SpindleProcess.RunAsync("serve", "--bind", "127.0.0.1", "--port", "0", "-r", image);
            Assert.Equal(1, second.ExitCode);
            Assert.Contains("is in use", second.StandardError, StringComparison.Ordinal);
        }

        await using (var qemu = await PeerServer.StartQemuNbdAsync(["-f", "qcow2", image]))
        {
            var refused = await SpindleProcess.RunAsync("serve", "--bind", "127.0.0.1", "--port", "0", image);
            Assert.Equal(1, refused.ExitCode);
            Assert.Contains("is in use", refused.StandardError, StringComparison.Ordinal);
        }

        // Readers share: a read-only qemu-nbd and a read-only Spindle serve the same image at once.
        await using (var qemu = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", image]))
        await using (var spindle = await Qcow2Peers.Serve("-r", image))
        {
            Assert.True(await Qcow2Peers.Same(spindle.Uri!, "raw", qemu.Uri(), "raw"));
        }
    }

    [Fact]
    public async Task Directory_exports_serve_qcow2_images_with_backing_files_confined_to_the_directory()
    {
        using var directory = new TempDirectory();
        var root = Directory.CreateDirectory(directory.File("images")).FullName;
        var basePath = Path.Combine(root, "base.raw");
        await Qcow2Peers.Img("create", "-q", "-f", "raw", basePath, "16M");
        await Qcow2Peers.Io(basePath, "raw", "write -P 0xb0 0 16M");
        var overlay = await Qcow2Peers.CreateAt(Path.Combine(root, "vm.qcow2"), "cluster_size=65536", 16L << 20, "-b", "base.raw", "-F", "raw");
        await Qcow2Peers.Io(overlay, "qcow2", "write -P 0xc1 4M 1M");
        var secret = directory.File("secret.raw");
        await File.WriteAllTextAsync(secret, "outside the export directory");
        await Qcow2Peers.CreateAt(Path.Combine(root, "evil.qcow2"), "cluster_size=65536", 1L << 20, "-u", "-b", secret, "-F", "raw");

        await using (var spindle = await SpindleProcess.StartAsync("serve", "--dir", root, "--bind", "127.0.0.1", "--port", "0", "--print-uri"))
        {
            var server = spindle.Uri!.TrimEnd('/');
            var info = await Qcow2Peers.Output("nbdinfo", "--json", server + "/vm.qcow2");
            using (var json = JsonDocument.Parse(info))
            {
                var export = json.RootElement.GetProperty("exports")[0];
                Assert.Equal(16L << 20, export.GetProperty("export-size").GetInt64());
                Assert.True(export.GetProperty("can_multi_conn").GetBoolean());
            }

            await Qcow2Peers.Io(server + "/vm.qcow2", "raw", "read -P 0xb0 0 4M", "read -P 0xc1 4M 1M", "write -P 0xd2 8M 64k");
            var depth = await Qcow2Peers.Output("nbdinfo", "--map=qemu:allocation-depth", server + "/vm.qcow2");
            Assert.Contains("backing depth 2", depth, StringComparison.Ordinal);

            // An image naming a file outside the directory as its backing file is refused (nbdinfo shows the error
            // code, spindle info the server's message too); the file is never opened.
            var evil = await PeerTool.RunAsync("nbdinfo", [server + "/evil.qcow2"]);
            Assert.NotEqual(0, evil.ExitCode);
            var refused = await SpindleProcess.RunAsync("info", server + "/evil.qcow2");
            Assert.NotEqual(0, refused.ExitCode);
            Assert.Contains("NBD_REP_ERR_POLICY", refused.StandardError, StringComparison.Ordinal);
            Assert.Contains("is outside the export directory", refused.StandardError, StringComparison.Ordinal);

            // The raw backing file is an export of its own, served as raw bytes.
            Assert.Equal((16L << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), (await Qcow2Peers.Output("nbdinfo", "--size", server + "/base.raw")).Trim());
        }

        await Qcow2Peers.Io(overlay, "qcow2", "read -P 0xd2 8M 64k", "read -P 0xb0 8256k 64k");
        await Qcow2Peers.AssertClean(overlay, allowLeaks: false);

        // --format raw serves the qcow2 file's own bytes.
        await using (var spindle = await SpindleProcess.StartAsync("serve", "--dir", root, "--format", "raw", "-r", "--bind", "127.0.0.1", "--port", "0", "--print-uri"))
        {
            Assert.Equal(new FileInfo(overlay).Length.ToString(System.Globalization.CultureInfo.InvariantCulture), (await Qcow2Peers.Output("nbdinfo", "--size", spindle.Uri!.TrimEnd('/') + "/vm.qcow2")).Trim());
        }
    }

    [Fact]
    public async Task Spindle_copy_reads_qcow2_images_and_snapshots_and_writes_into_an_existing_qcow2()
    {
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536,extended_l2=on", Size);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x61 0 3M", "write -z 3M 1M", "write -P 0x62 40M 100k");
        await Qcow2Peers.Img("snapshot", "-c", "s", image);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x63 0 1M");

        var raw = directory.File("vm.raw");
        var copied = await SpindleProcess.RunAsync("copy", "--json", image, raw);
        Assert.True(copied.ExitCode == 0, copied.ToString());
        using (var json = JsonDocument.Parse(copied.StandardOutput))
        {
            Assert.Equal("qcow2", json.RootElement.GetProperty("source_info").GetProperty("kind").GetString());
        }

        Assert.True(await Qcow2Peers.Same(raw, "raw", image, "qcow2"));

        var snapshot = directory.File("s.raw");
        Assert.Equal(0, (await SpindleProcess.RunAsync("copy", image + "@s", snapshot)).ExitCode);
        await Qcow2Peers.Io(snapshot, "raw", "read -P 0x61 0 3M");

        // Into an existing qcow2: it stays qcow2 (its format, its size), only its contents change.
        var target = await Qcow2Peers.Create(directory, "target.qcow2", "cluster_size=4096", Size);
        var into = await SpindleProcess.RunAsync("copy", raw, target);
        Assert.True(into.ExitCode == 0, into.ToString());
        Assert.True(await Qcow2Peers.Same(target, "qcow2", raw, "raw"));
        await Qcow2Peers.AssertClean(target, allowLeaks: false);
        using var info = JsonDocument.Parse(await Qcow2Peers.Output("qemu-img", "info", "--output=json", target));
        Assert.Equal("qcow2", info.RootElement.GetProperty("format").GetString());
    }
}
