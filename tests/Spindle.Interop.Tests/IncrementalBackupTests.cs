using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// The whole incremental backup of issue 14 with Spindle at both ends: a raw image served with
/// <c>spindle serve --bitmap NAME</c> records what qemu-io changes, <c>spindle copy --bitmap NAME</c> brings a full
/// copy up to date from the read-only server, cmp finds the copy identical, and after <c>spindle bitmap clear</c> a
/// second round copies only the second round's changes. The same from the local image with no server (the bitmap read
/// from its file, or a qcow2 image's own bitmap), refused while a server holds the bitmap.
/// </summary>
public sealed class IncrementalBackupTests
{
    private const int Mi = 1024 * 1024;
    private const long Size = 64L * Mi;

    [Fact]
    public async Task Two_incremental_rounds_from_a_bitmap_on_a_raw_image_leave_the_copy_identical_to_cmp()
    {
        using var directory = new TempDirectory();
        var image = directory.File("disk.img");
        await File.WriteAllBytesAsync(image, Patterns.Random((int)Size, seed: 14), TestContext.Current.CancellationToken);
        var backup = directory.File("backup.img");

        // The bitmap starts clean, then the full copy: from here on the bitmap says what the copy lacks.
        var add = await SpindleProcess.RunAsync("bitmap", "add", image, "backup");
        Assert.True(add.ExitCode == 0, add.ToString());
        var full = await SpindleProcess.RunAsync("copy", image, backup);
        Assert.True(full.ExitCode == 0, full.ToString());

        string[][] rounds =
        [
            ["write -P 0x11 1M 100k", "write -P 0x22 30M 3k", "write -z 8M 1M", "discard 20M 2M", "write -P 0x33 63M 4k"],
            ["write -P 0x44 5M 64k", "write -P 0x55 40000 9000", "write -z 50M 512k"],
        ];
        foreach (var changes in rounds)
        {
            await using (var writable = await SpindleProcess.StartAsync("serve", "--bitmap", "backup", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
            {
                await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", .. changes.SelectMany(c => new[] { "-c", c }), writable.Uri!]);
                Assert.Equal(0, await writable.StopAsync());
            }

            // A changed image and a stale copy; the copy is taken from a read-only server so nothing changes under it.
            Assert.NotEqual(0, (await PeerTool.RunAsync("cmp", ["-s", image, backup])).ExitCode);
            JsonElement summary;
            await using (var server = await SpindleProcess.StartAsync("serve", "-r", "--bitmap", "backup", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
            {
                var copy = await SpindleProcess.RunAsync("copy", "--json", "--bitmap", "backup", server.Uri!, backup);
                Assert.True(copy.ExitCode == 0, copy.ToString());
                summary = JsonDocument.Parse(copy.StandardOutput).RootElement.Clone();
                Assert.Equal(0, await server.StopAsync());
            }

            await PeerTool.RunCheckedAsync("cmp", [image, backup]);
            var dirty = summary.GetProperty("dirty_bytes").GetInt64();
            Assert.True(dirty > 0 && dirty < Size / 8, summary.ToString());
            Assert.Equal(dirty, summary.GetProperty("bytes").GetInt64());

            // The backup is complete: the next round records only what changes after it.
            var clear = await SpindleProcess.RunAsync("bitmap", "clear", image, "backup");
            Assert.True(clear.ExitCode == 0, clear.ToString());
        }
    }

    [Fact]
    public async Task A_local_image_is_a_source_with_its_bitmap_file_or_its_own_qcow2_bitmap_but_not_while_served()
    {
        using var directory = new TempDirectory();
        var image = directory.File("disk.img");
        await File.WriteAllBytesAsync(image, Patterns.Random((int)Size, seed: 15), TestContext.Current.CancellationToken);
        var backup = directory.File("backup.img");
        Assert.Equal(0, (await SpindleProcess.RunAsync("bitmap", "add", image, "nightly")).ExitCode);
        Assert.Equal(0, (await SpindleProcess.RunAsync("copy", image, backup)).ExitCode);

        await using (var server = await SpindleProcess.StartAsync("serve", "--bitmap", "nightly", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
        {
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x66 2M 70k", "-c", "write -z 12M 256k", "-c", "write -P 0x77 33M 512", server.Uri!]);

            // The server holds the bitmap: the image is live, so a local copy is refused and the backup left alone.
            var busy = await SpindleProcess.RunAsync("copy", "--bitmap", "nightly", image, backup);
            Assert.Equal(1, busy.ExitCode);
            Assert.Contains("nightly", busy.StandardError, StringComparison.Ordinal);
            Assert.Equal(0, await server.StopAsync());
        }

        var unknown = await SpindleProcess.RunAsync("copy", "--bitmap", "weekly", image, backup);
        Assert.Equal(1, unknown.ExitCode);
        Assert.Contains("nightly", unknown.StandardError, StringComparison.Ordinal); // names the bitmaps it has

        var copy = await SpindleProcess.RunAsync("copy", "--json", "--bitmap", "nightly", image, backup);
        Assert.True(copy.ExitCode == 0, copy.ToString());
        await PeerTool.RunCheckedAsync("cmp", [image, backup]);
        var summary = JsonDocument.Parse(copy.StandardOutput).RootElement;
        Assert.Equal(7 * 64 * 1024, summary.GetProperty("dirty_bytes").GetInt64()); // 2M+70k: 2 granules; 12M+256k: 4; 33M+512: 1
        Assert.Equal(0, (await SpindleProcess.RunAsync("bitmap", "list", image)).ExitCode);

        // A qcow2 image's own persistent bitmap, kept by qemu-io: the same command, no server either.
        var qcow2 = directory.File("vm.qcow2");
        await PeerTool.RunCheckedAsync("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", image, qcow2]);
        var qcow2Backup = directory.File("vm-backup.img");
        Assert.Equal(0, (await SpindleProcess.RunAsync("copy", qcow2, qcow2Backup)).ExitCode);
        await PeerTool.RunCheckedAsync("qemu-img", ["bitmap", "--add", qcow2, "q"]);
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x88 7M 1M", qcow2]);
        var fromQcow2 = await SpindleProcess.RunAsync("copy", "--json", "--bitmap", "q", qcow2, qcow2Backup);
        Assert.True(fromQcow2.ExitCode == 0, fromQcow2.ToString());
        Assert.Equal(1L << 20, JsonDocument.Parse(fromQcow2.StandardOutput).RootElement.GetProperty("dirty_bytes").GetInt64());
        var raw = directory.File("vm.raw");
        await PeerTool.RunCheckedAsync("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", qcow2, raw]);
        await PeerTool.RunCheckedAsync("cmp", [raw, qcow2Backup]);
    }
}
