using System.Collections.Concurrent;
using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using Spindle.Storage.Layers;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// Crash-safe dirty bitmaps (issue 14) driven by real peers: qemu-io changes an export, nbdinfo and spindle info read
/// qemu:dirty-bitmap:NAME back, a libnbd writer is killed under with kill -9 and every acknowledged range must
/// still be dirty, and the management commands, hostile files, qcow2 name clashes and stacking on an overlay and a
/// partition.
/// </summary>
public sealed class BitmapInteropTests(ITestOutputHelper output)
{
    private const int Ki = 1024;
    private const int Mi = 1024 * 1024;

    [Fact]
    public async Task Nbdinfo_and_spindle_info_map_exactly_the_ranges_qemu_io_wrote_zeroed_and_trimmed()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", 64 * Mi);
        const long granularity = 64 * Ki;

        // (offset, length) of each change; unaligned ones dirty every granule they touch.
        (long Offset, long Length)[] changes = [(1 * Mi, 4 * Ki), (3000, 5000), (8 * Mi, Mi), (20 * Mi, 200 * Ki), (63 * Mi + 1, 1), (40 * Mi - 1, 2)];
        var expected = Runs(changes, granularity, 64 * Mi);
        await using (var spindle = await SpindleProcess.StartAsync("serve", "--bitmap", "b", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
        {
            var uri = spindle.Uri!;
            var info = await PeerTool.RunCheckedAsync("nbdinfo", ["--json", uri]);
            using (var json = JsonDocument.Parse(info.StandardOutput))
            {
                var contexts = json.RootElement.GetProperty("exports")[0].GetProperty("contexts").EnumerateArray().Select(c => c.GetString()).ToList();
                Assert.Contains("base:allocation", contexts);
                Assert.Contains("qemu:dirty-bitmap:b", contexts);
            }

            Assert.Empty(await DirtyRunsAsync("nbdinfo", uri, "b")); // a new bitmap is all clean

            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw",
                "-c", "write -P 0x11 1M 4k", "-c", "write -P 0x22 3000 5000", "-c", "write -z 8M 1M", "-c", "discard 20M 200k",
                "-c", $"write -P 0x33 {(63 * Mi) + 1} 1", "-c", $"write -P 0x44 {(40 * Mi) - 1} 2", uri]);
            Assert.Equal(expected, await DirtyRunsAsync("nbdinfo", uri, "b"));
            Assert.Equal(expected, await DirtyRunsAsync("spindle", uri, "b"));

            // base:allocation still comes from the image below: the write at 1M is data.
            var allocation = await PeerTool.RunCheckedAsync("nbdinfo", ["--map", uri]);
            Assert.Contains(allocation.StandardOutput.Split('\n'), line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries) is [var o, _, "0", ..] && o == Mi.ToString(CultureInfo.InvariantCulture));

            // Writing dirty ranges again changes nothing; the bitmap persists across a clean stop.
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x55 1M 64k", uri]);
            Assert.Equal(expected, await DirtyRunsAsync("nbdinfo", uri, "b"));
            Assert.Equal(0, await spindle.StopAsync());
        }

        var list = await ListAsync(image);
        Assert.Equal(expected.Sum(r => r.Length), Assert.Single(list).GetProperty("dirty_bytes").GetInt64());
        await using var again = await SpindleProcess.StartAsync("serve", "-r", "--bitmap", "b", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        Assert.Equal(expected, await DirtyRunsAsync("nbdinfo", again.Uri!, "b"));
    }

    [Fact]
    public async Task Kill_9_mid_workload_never_loses_an_acknowledged_range()
    {
        using var directory = new TempDirectory();
        const long size = 128L * Mi;
        const long granularity = 64 * Ki;
        var image = directory.CreateSparseFile("disk.img", size);
        var random = new Random(Environment.TickCount);
        int kills = 0, acknowledged = 0, granulesChecked = 0, missing = 0, rangesMapped = 0;
        for (var round = 0; round < 5; round++)
        {
            var lines = new ConcurrentQueue<string>();
            var target = random.Next(50, 600);
            await using (var spindle = await SpindleProcess.StartAsync("serve", "--bitmap", "k", "--bitmap", "k2", "--bitmap-granularity", "64K", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
            {
                using var writer = PeerTool.Start(PeerTool.SystemPython, [Script("bitmap_writer.py"), spindle.Uri!, random.Next().ToString(CultureInfo.InvariantCulture), "40"], onOutput: lines.Enqueue);
                var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(40);
                while (lines.Count < target && !writer.HasExited && DateTime.UtcNow < deadline)
                {
                    await Task.Delay(5, TestContext.Current.CancellationToken);
                }

                await Task.Delay(random.Next(0, 20), TestContext.Current.CancellationToken);
                PeerTool.Signal(spindle.Process, 9);
                kills++;
                using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                await spindle.Process.WaitForExitAsync(wait.Token);
                await writer.WaitForExitAsync(wait.Token);
                Assert.DoesNotContain(lines, l => l.StartsWith("E ", StringComparison.Ordinal));
            }

            var acks = lines.Where(l => l.StartsWith("A ", StringComparison.Ordinal)).Select(l => l.Split(' ')).Select(w => (Offset: long.Parse(w[2], CultureInfo.InvariantCulture), Length: long.Parse(w[3], CultureInfo.InvariantCulture))).ToList();
            Assert.NotEmpty(acks);
            acknowledged += acks.Count;
            foreach (var name in new[] { "k", "k2" })
            {
                using var bitmap = new DirtyBitmap(FileBitmapStore.Open(BitmapLocation.For(image, false, null).PathOf(name), writable: false));
                Assert.False(((FileBitmapStore)bitmap.Store).InUse); // the killed server's lock died with it
                foreach (var (offset, length) in acks)
                {
                    for (var bit = offset / granularity; bit <= (offset + length - 1) / granularity; bit++)
                    {
                        granulesChecked++;
                        missing += bitmap.IsDirtyBit(bit) ? 0 : 1;
                    }
                }
            }

            // A restarted server maps what the crash left: every acknowledged range inside a dirty run.
            await using (var restarted = await SpindleProcess.StartAsync("serve", "-r", "--bitmap", "k2", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
            {
                var runs = await DirtyRunsAsync("nbdinfo", restarted.Uri!, "k2");
                foreach (var (offset, length) in acks)
                {
                    rangesMapped++;
                    Assert.Contains(runs, run => run.Offset <= offset && offset + length <= run.Offset + run.Length);
                }
            }

            // The management commands read what the crash left; every other round starts clean again.
            var list = await ListAsync(image);
            Assert.All(list, row => Assert.True(row.GetProperty("dirty_bytes").GetInt64() > 0));
            if (round % 2 == 0)
            {
                Assert.Equal(0, (await SpindleProcess.RunAsync("bitmap", "clear", image, "k")).ExitCode);
            }
        }

        Assert.Equal(0, missing);
        output.WriteLine($"bitmap kill test: {kills} kills, {acknowledged} acknowledged writes/zeroes/trims checked, {granulesChecked} granules verified dirty in the files, {rangesMapped} ranges found dirty by nbdinfo after a restart, {missing} missing");
        Console.WriteLine($"BITMAP-KILL kills={kills} acknowledged={acknowledged} granules={granulesChecked} mapped={rangesMapped} missing={missing}");
    }

    [Fact]
    public async Task Management_commands_add_list_clear_remove_and_refuse_while_a_server_holds_the_bitmap()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", 32 * Mi);
        var add = await SpindleProcess.RunAsync("bitmap", "add", image, "m", "--granularity", "1M");
        Assert.Equal(0, add.ExitCode);
        Assert.Contains("full", add.StandardOutput, StringComparison.Ordinal);
        Assert.Equal(1, (await SpindleProcess.RunAsync("bitmap", "add", image, "m")).ExitCode);
        Assert.Equal(2, (await SpindleProcess.RunAsync("bitmap", "add", image, "bad/name")).ExitCode);
        Assert.Equal(2, (await SpindleProcess.RunAsync("bitmap", "add", image, "g", "--granularity", "1000")).ExitCode);
        var row = Assert.Single(await ListAsync(image));
        Assert.Equal(Mi, row.GetProperty("granularity").GetInt64());
        Assert.Equal(0, row.GetProperty("dirty_bytes").GetInt64());

        // A different granularity for an existing bitmap is refused at start; the same one is fine.
        var mismatch = await SpindleProcess.RunAsync("serve", "--bitmap", "m", "--bitmap-granularity", "64K", "--port", "0", image);
        Assert.Equal(1, mismatch.ExitCode); // the export cannot be opened
        Assert.Contains("granularity 1048576", mismatch.StandardError, StringComparison.Ordinal);

        await using (var spindle = await SpindleProcess.StartAsync("serve", "--bitmap", "m", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
        {
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write 5M 10", spindle.Uri!]);
            foreach (var verb in new[] { "clear", "remove" })
            {
                var refused = await SpindleProcess.RunAsync("bitmap", verb, image, "m");
                Assert.Equal(1, refused.ExitCode);
                Assert.Contains("in use by a running spindle server", refused.StandardError, StringComparison.Ordinal);
            }

            var second = await SpindleProcess.RunAsync("serve", "--bitmap", "m", "--port", "0", image);
            Assert.Equal(1, second.ExitCode); // the export cannot be opened
            Assert.Contains("in use", second.StandardError, StringComparison.Ordinal);

            var live = Assert.Single(await ListAsync(image));
            Assert.True(live.GetProperty("in_use").GetBoolean());
            Assert.Equal(Mi, live.GetProperty("dirty_bytes").GetInt64());
            var text = await SpindleProcess.RunAsync("bitmap", "list", image);
            Assert.Matches(@"m\s+1048576\s+1048576\s+33554432\s+in use", text.StandardOutput);
            Assert.Equal(0, await spindle.StopAsync());
        }

        Assert.Equal(0, (await SpindleProcess.RunAsync("bitmap", "clear", image, "m")).ExitCode);
        Assert.Equal(0, Assert.Single(await ListAsync(image)).GetProperty("dirty_bytes").GetInt64());
        Assert.Equal(0, (await SpindleProcess.RunAsync("bitmap", "remove", image, "m")).ExitCode);
        Assert.Empty(await ListAsync(image));
        Assert.Equal(1, (await SpindleProcess.RunAsync("bitmap", "remove", image, "m")).ExitCode);
        Assert.Equal("disk.img", Path.GetFileName(Assert.Single(Directory.GetFiles(directory.Path))));

        // The configuration file's keys, with a state directory.
        var state = Directory.CreateDirectory(directory.File("state")).FullName;
        var config = directory.File("config");
        await File.WriteAllTextAsync(config, $"""
            [generic]
                listenaddr = 127.0.0.1
                port = 0
            [disk]
                exportname = {image}
                bitmap = c1, c2
                bitmap_granularity = 128K
                bitmap_dir = {state}
            """);
        await using (var configured = await SpindleProcess.StartAsync("serve", "--config", config, "--print-uri"))
        {
            var uri = $"nbd://127.0.0.1:{new Uri(configured.Uri!).Port}/disk";
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write 1M 1", uri]);
            Assert.Equal([(Mi, 128 * Ki)], await DirtyRunsAsync("nbdinfo", uri, "c2"));
            Assert.Equal(0, await configured.StopAsync());
        }

        var listed = await ListAsync(image, "--bitmap-dir", state);
        Assert.Equal("c1,c2", string.Join(',', listed.Select(r => r.GetProperty("name").GetString())));
        Assert.All(listed, r => Assert.Equal(128 * Ki, r.GetProperty("dirty_bytes").GetInt64()));
    }

    [Fact]
    public async Task A_hostile_bitmap_file_is_refused_at_start_and_listed_as_damaged()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", 16 * Mi);
        var file = BitmapLocation.For(image, false, null).PathOf("h");
        await File.WriteAllBytesAsync(file, Patterns.Random(8192, seed: 5));
        var serve = await SpindleProcess.RunAsync("serve", "--bitmap", "h", "--port", "0", image);
        Assert.Equal(1, serve.ExitCode); // the export cannot be opened
        Assert.Contains("refusing the bitmap", serve.StandardError, StringComparison.Ordinal);
        Assert.Contains("bad magic", serve.StandardError, StringComparison.Ordinal);

        var list = await SpindleProcess.RunAsync("bitmap", "list", image);
        Assert.Equal(1, list.ExitCode);
        Assert.Contains("damaged", list.StandardOutput, StringComparison.Ordinal);
        Assert.Equal(1, (await SpindleProcess.RunAsync("bitmap", "clear", image, "h")).ExitCode);
        Assert.Equal(0, (await SpindleProcess.RunAsync("bitmap", "remove", image, "h")).ExitCode);

        // A bitmap made for another size is refused too.
        FileBitmapStore.Create(file, "h", 64 * Ki, 8 * Mi).Dispose();
        var size = await SpindleProcess.RunAsync("serve", "--bitmap", "h", "--port", "0", image);
        Assert.Equal(1, size.ExitCode); // the export cannot be opened
        Assert.Contains("describes 8388608 bytes", size.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_qcow2_image_offers_its_own_bitmaps_beside_ours_and_a_clashing_name_is_refused()
    {
        using var directory = new TempDirectory();
        var image = directory.File("disk.qcow2");
        await PeerTool.RunCheckedAsync("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"]);
        await PeerTool.RunCheckedAsync("qemu-img", ["bitmap", "--add", image, "q"]);
        var clash = await SpindleProcess.RunAsync("serve", "--bitmap", "q", "--port", "0", image);
        Assert.Equal(1, clash.ExitCode); // the export cannot be opened
        Assert.Contains("already offers qemu:dirty-bitmap:q", clash.StandardError, StringComparison.Ordinal);

        await using var spindle = await SpindleProcess.StartAsync("serve", "--bitmap", "s", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write 2M 4k", spindle.Uri!]);
        Assert.Equal([(2 * Mi, 64 * Ki)], await DirtyRunsAsync("nbdinfo", spindle.Uri!, "s"));
        Assert.Equal([(2 * Mi, 64 * Ki)], await DirtyRunsAsync("nbdinfo", spindle.Uri!, "q")); // qemu's own bitmap, kept by the qcow2 backend
    }

    [Fact]
    public async Task Bitmaps_stack_over_a_cow_overlay_and_over_a_partition()
    {
        using var directory = new TempDirectory();
        var image = directory.File("base.img");
        await File.WriteAllBytesAsync(image, Patterns.Random(16 * Mi, seed: 8));
        var before = Hash(image);
        await using (var spindle = await SpindleProcess.StartAsync("serve", "--cow", "--cow-dir", directory.Path, "--bitmap", "o", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image))
        {
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x7 3M 100k", "-c", "discard 10M 64k", spindle.Uri!]);
            Assert.Equal([(3 * Mi, 128 * Ki), (10 * Mi, 64 * Ki)], await DirtyRunsAsync("nbdinfo", spindle.Uri!, "o"));
            var read = await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "read -P 0x7 3M 100k", spindle.Uri!]);
            Assert.DoesNotContain("Pattern verification failed", read.StandardOutput, StringComparison.Ordinal);
            Assert.Equal(0, await spindle.StopAsync());
        }

        Assert.Equal(before, Hash(image)); // the overlay kept the base untouched; the bitmap says what the client changed

        var disk = directory.File("gpt.img");
        await File.WriteAllBytesAsync(disk, new byte[32 * Mi]);
        await PeerTool.RunCheckedAsync("sgdisk", ["-o", "-n", "1:2048:+8M", "-n", "2:18432:+16M", disk]);
        await using (var spindle = await SpindleProcess.StartAsync("serve", "--partition", "2", "--bitmap", "p", "--bind", "127.0.0.1", "--port", "0", "--print-uri", disk))
        {
            await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x9 1M 4k", "-c", "write -z 15M 1M", spindle.Uri!]);
            Assert.Equal([(Mi, 64 * Ki), (15 * Mi, Mi)], await DirtyRunsAsync("spindle", spindle.Uri!, "p"));
            Assert.Equal(0, await spindle.StopAsync());
        }

        var partition = Assert.Single(await ListAsync(disk));
        Assert.Equal(16 * Mi, partition.GetProperty("image_size").GetInt64()); // the bitmap covers the partition
        var whole = await SpindleProcess.RunAsync("serve", "--bitmap", "p", "--port", "0", disk);
        Assert.Equal(1, whole.ExitCode); // the export cannot be opened // the partition's bitmap does not describe the whole disk
    }

    [Fact]
    public async Task A_block_device_keeps_its_bitmaps_in_the_state_directory()
    {
        using var directory = new TempDirectory();
        var backing = directory.CreateSparseFile("backing.img", 16 * Mi);
        var state = Directory.CreateDirectory(directory.File("state")).FullName;
        var device = (await PeerTool.RunCheckedAsync("losetup", ["--find", "--show", backing])).StandardOutput.Trim();
        try
        {
            await using (var spindle = await SpindleProcess.StartAsync("serve", "--bitmap", "d", "--bitmap-dir", state, "--bind", "127.0.0.1", "--port", "0", "--print-uri", device))
            {
                await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x6 5M 4k", "-c", "discard 9M 128k", spindle.Uri!]);
                Assert.Equal([(5 * Mi, 64 * Ki), (9 * Mi, 128 * Ki)], await DirtyRunsAsync("nbdinfo", spindle.Uri!, "d"));
                Assert.Equal(0, await spindle.StopAsync());
            }

            // Keyed by the device's /dev/disk/by-id name, or its escaped path where it has none; never beside it.
            var file = Path.GetFileName(Assert.Single(Directory.GetFiles(state)));
            Assert.EndsWith(".d.spindle-bitmap", file, StringComparison.Ordinal);
            var row = Assert.Single(await ListAsync(device, "--bitmap-dir", state));
            Assert.Equal(192 * Ki, row.GetProperty("dirty_bytes").GetInt64());
            Assert.Equal(0, (await SpindleProcess.RunAsync("bitmap", "remove", "--bitmap-dir", state, device, "d")).ExitCode);
            Assert.Empty(Directory.GetFiles(state));
        }
        finally
        {
            await PeerTool.RunAsync("losetup", ["-d", device]);
        }
    }

    /// <summary>The dirty runs of qemu:dirty-bitmap:NAME as nbdinfo or spindle info maps them.</summary>
    private static async Task<List<(long Offset, long Length)>> DirtyRunsAsync(string tool, string uri, string name)
    {
        var result = tool == "nbdinfo"
            ? await PeerTool.RunCheckedAsync("nbdinfo", [$"--map=qemu:dirty-bitmap:{name}", uri])
            : await SpindleProcess.RunAsync("info", "--map", "--context", $"qemu:dirty-bitmap:{name}", uri);
        Assert.Equal(0, result.ExitCode);
        var runs = new List<(long Offset, long Length)>();
        foreach (var line in result.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var words = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (words.Length >= 3 && long.TryParse(words[0], CultureInfo.InvariantCulture, out var offset) && long.TryParse(words[1], CultureInfo.InvariantCulture, out var length) && words[2] == "1")
            {
                if (runs.Count > 0 && runs[^1].Offset + runs[^1].Length == offset)
                {
                    runs[^1] = (runs[^1].Offset, runs[^1].Length + length);
                }
                else
                {
                    runs.Add((offset, length));
                }
            }
        }

        return runs;
    }

    /// <summary>The granule-rounded, merged runs <paramref name="changes"/> dirty.</summary>
    private static List<(long Offset, long Length)> Runs(IEnumerable<(long Offset, long Length)> changes, long granularity, long size)
    {
        var bits = new bool[(size + granularity - 1) / granularity];
        foreach (var (offset, length) in changes)
        {
            for (var bit = offset / granularity; bit <= (offset + length - 1) / granularity; bit++)
            {
                bits[bit] = true;
            }
        }

        var runs = new List<(long Offset, long Length)>();
        for (var bit = 0; bit < bits.Length; bit++)
        {
            if (!bits[bit])
            {
                continue;
            }

            var end = Math.Min((bit + 1) * granularity, size);
            if (runs.Count > 0 && runs[^1].Offset + runs[^1].Length == bit * granularity)
            {
                runs[^1] = (runs[^1].Offset, end - runs[^1].Offset);
            }
            else
            {
                runs.Add((bit * granularity, end - (bit * granularity)));
            }
        }

        return runs;
    }

    private static async Task<List<JsonElement>> ListAsync(string image, params string[] extra)
    {
        var result = await SpindleProcess.RunAsync(["bitmap", "list", "--json", image, .. extra]);
        Assert.True(result.ExitCode == 0, result.StandardError);
        using var json = JsonDocument.Parse(result.StandardOutput);
        return json.RootElement.EnumerateArray().Select(e => e.Clone()).ToList();
    }

    private static string Script(string name) => Path.Combine(AppContext.BaseDirectory, "python", name);

    private static string Hash(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexString(SHA256.HashData(stream));
    }
}
