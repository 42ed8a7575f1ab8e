using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// The incremental backup: <c>spindle copy --bitmap NAME</c> from a qcow2 image whose persistent dirty bitmap
/// (qemu-img bitmap --add) recorded what qemu-io changed since the full copy, served by qemu-nbd -B NAME (7.2, and
/// 10 with extended headers from the Debian 13 root) and by <c>spindle serve</c>. The oracle is qemu: qemu-img convert
/// of the image to raw against the backup with cmp, and nbdinfo's map of the bitmap against what was read.
/// </summary>
public sealed class CopyBitmapInteropTests
{
    private const long Size = 64L << 20;
    private const string Bitmap = "b1";
    private const string Context = "qemu:dirty-bitmap:" + Bitmap;

    /// <summary>What qemu-io changes after the full copy: data (one write unaligned), zeroes, a discard, the last block.</summary>
    private static readonly string[] Changes =
    [
        "write -P 0x22 1M 100k", "write -P 0x44 30M 3k", "write -z 8M 1M", "discard 20M 2M", "write -P 0x33 63M 4k",
    ];

    [Fact]
    public async Task Qemu_nbd_B_bitmap_brings_a_raw_copy_up_to_date_and_leaves_clean_ranges_alone()
    {
        using var directory = new TempDirectory();
        var (image, backup) = await FullBackupAsync(directory);

        // A second full backup as a qcow2 image (spindle writes into an existing one through its format).
        var qcow2Backup = directory.File("backup.qcow2");
        await Qcow2Peers.Img("convert", "-f", "qcow2", "-O", "qcow2", image, qcow2Backup);
        await Qcow2Peers.Io(image, "qcow2", Changes);

        // A change on the backup in a range the bitmap says is clean: an incremental copy must not touch it.
        const long Marker = 40L << 20;
        await using (var file = new FileStream(backup, FileMode.Open, FileAccess.Write))
        {
            file.Position = Marker;
            await file.WriteAsync(Enumerable.Repeat((byte)0xee, 512).ToArray(), TestContext.Current.CancellationToken);
        }

        JsonElement json;
        List<(long Offset, long Length)> dirty;
        await using (var qemu = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", "-B", Bitmap, image]))
        {
            dirty = await DirtyRangesAsync(qemu.Uri());
            var copy = await SpindleProcess.RunAsync("copy", "--json", "--bitmap", Bitmap, qemu.Uri(), backup);
            Assert.True(copy.ExitCode == 0, copy.ToString());
            json = JsonDocument.Parse(copy.StandardOutput).RootElement.Clone();
            var intoQcow2 = await SpindleProcess.RunAsync("copy", "--json", "--bitmap", Bitmap, qemu.Uri(), qcow2Backup);
            Assert.True(intoQcow2.ExitCode == 0, intoQcow2.ToString());
            Assert.Equal("qcow2", JsonDocument.Parse(intoQcow2.StandardOutput).RootElement.GetProperty("destination_info").GetProperty("kind").GetString());
        }

        Assert.True(await Qcow2Peers.Same(image, "qcow2", qcow2Backup, "qcow2"), "the qcow2 backup differs from the image");
        await Qcow2Peers.AssertClean(qcow2Backup);
        Assert.Equal(Context, json.GetProperty("bitmap").GetString());
        Assert.Equal(dirty.Sum(range => range.Length), json.GetProperty("dirty_bytes").GetInt64());
        Assert.Equal(dirty.Sum(range => range.Length), json.GetProperty("bytes").GetInt64());
        Assert.True(json.GetProperty("bytes").GetInt64() < Size / 8, json.ToString());

        // The 3 MiB zeroed and discarded became zeroes on the backup without being read as data.
        Assert.True(json.GetProperty("zeroed_bytes").GetInt64() >= 3L << 20, json.ToString());

        // cmp finds the backup identical to the image but for the marker's 512 bytes (the source has 0x11 there).
        var raw = await ConvertToRawAsync(image, directory);
        var differences = await PeerTool.RunAsync("cmp", ["-l", raw, backup]);
        Assert.True(differences.ExitCode == 1, differences.ToString());
        var offsets = differences.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(line => long.Parse(line.Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries)[0], CultureInfo.InvariantCulture) - 1)
            .ToList();
        Assert.Equal(512, offsets.Count);
        Assert.All(offsets, offset => Assert.InRange(offset, Marker, Marker + 511));
    }

    [Fact]
    public async Task Spindle_serve_of_the_qcow2_bitmap_is_read_only_where_dirty_and_the_nbd_destination_matches()
    {
        using var directory = new TempDirectory();
        var (image, backup) = await FullBackupAsync(directory);
        await Qcow2Peers.Io(image, "qcow2", Changes);
        var log = directory.File("requests.log");
        JsonElement json;
        List<(long Offset, long Length)> dirty;
        await using (var spindle = await Qcow2Peers.Serve("-r", "--log-requests", log, image))
        {
            await using (var destination = await PeerServer.StartQemuNbdAsync(["-f", "raw", backup]))
            {
                dirty = await DirtyRangesAsync(spindle.Uri!);
                var copy = await SpindleProcess.RunAsync("copy", "--json", "--bitmap", Bitmap, spindle.Uri!, destination.Uri());
                Assert.True(copy.ExitCode == 0, copy.ToString());
                json = JsonDocument.Parse(copy.StandardOutput).RootElement.Clone();
            }

            Assert.Equal(0, await spindle.StopAsync());
        }

        Assert.Equal(dirty.Sum(range => range.Length), json.GetProperty("dirty_bytes").GetInt64());
        Assert.Equal("nbd", json.GetProperty("destination_info").GetProperty("kind").GetString());

        // Every READ the server logged lay inside a dirty range; the zeroed and discarded ranges were not read.
        var reads = (await File.ReadAllLinesAsync(log, TestContext.Current.CancellationToken))
            .Where(line => line.Contains(" READ ", StringComparison.Ordinal))
            .Select(line => (Offset: Field(line, "offset="), Length: Field(line, "length=")))
            .ToList();
        Assert.NotEmpty(reads);
        Assert.All(reads, read => Assert.Contains(dirty, range => read.Offset >= range.Offset && read.Offset + read.Length <= range.Offset + range.Length));
        Assert.True(reads.Sum(read => read.Length) <= dirty.Sum(range => range.Length) - (3L << 20), string.Join('\n', reads));

        var raw = await ConvertToRawAsync(image, directory);
        await PeerTool.RunCheckedAsync("cmp", [raw, backup]);
    }

    [Fact]
    public async Task Refusals_against_qemu_nbd_name_the_offered_contexts_and_keep_the_destination()
    {
        using var directory = new TempDirectory();
        var (image, backup) = await FullBackupAsync(directory);
        var before = await File.ReadAllBytesAsync(backup, TestContext.Current.CancellationToken);
        await using var qemu = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", "-B", Bitmap, image]);

        var missing = await SpindleProcess.RunAsync("copy", "--bitmap", "other", qemu.Uri(), backup);
        Assert.True(missing.ExitCode == 1, missing.ToString());
        Assert.Contains("does not offer qemu:dirty-bitmap:other; it offers base:allocation, " + Context, missing.StandardError, StringComparison.Ordinal);

        var absent = await SpindleProcess.RunAsync("copy", "--bitmap", Bitmap, qemu.Uri(), directory.File("absent.raw"));
        Assert.True(absent.ExitCode == 1, absent.ToString());
        Assert.Contains("does not exist", absent.StandardError, StringComparison.Ordinal);
        Assert.False(File.Exists(directory.File("absent.raw")));

        var larger = directory.CreateSparseFile("larger.raw", Size + (1 << 20));
        var mismatch = await SpindleProcess.RunAsync("copy", "--bitmap", Bitmap, qemu.Uri(), larger);
        Assert.True(mismatch.ExitCode == 1, mismatch.ToString());
        Assert.Contains($"is {Size + (1 << 20)} bytes but the source is {Size}", mismatch.StandardError, StringComparison.Ordinal);
        Assert.Equal(Size + (1 << 20), new FileInfo(larger).Length);

        // The local image read directly: a bitmap it does not have is refused, naming the one it has.
        var local = await SpindleProcess.RunAsync("copy", "--bitmap", "other", image, backup);
        Assert.True(local.ExitCode == 1, local.ToString());
        Assert.Contains($"has no bitmap 'other' (it has {Bitmap};", local.StandardError, StringComparison.Ordinal);

        // Without -B, qemu-nbd offers only base:allocation.
        await using var plain = await PeerServer.StartQemuNbdAsync(["-r", "-f", "qcow2", image]);
        var unoffered = await SpindleProcess.RunAsync("copy", "--bitmap", Bitmap, plain.Uri(), backup);
        Assert.True(unoffered.ExitCode == 1, unoffered.ToString());
        Assert.Contains("it offers base:allocation", unoffered.StandardError, StringComparison.Ordinal);

        Assert.Equal(before, await File.ReadAllBytesAsync(backup, TestContext.Current.CancellationToken));
    }

    [Fact]
    public async Task Qemu_nbd_10_with_extended_headers_serves_a_bitmap_over_a_6_GiB_image()
    {
        const long Big = 6L << 30;
        using var scratch = Trixie.CreateScratch();
        var image = scratch.RootPath("vm.qcow2");
        await Trixie.RunCheckedAsync("qemu-img", ["create", "-q", "-f", "qcow2", image, Big.ToString(CultureInfo.InvariantCulture)]);
        await Trixie.RunCheckedAsync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 5G 4M", image]);
        await Trixie.RunCheckedAsync("qemu-img", ["bitmap", "--add", image, Bitmap]);
        var backup = scratch.HostPath("backup.raw");
        var port = PeerServer.FreePort();
        await using (var full = await StartTrixieQemuNbdAsync(["-r", "-f", "qcow2", image], port))
        {
            var copy = await SpindleProcess.RunAsync("copy", $"nbd://127.0.0.1:{port}/", backup);
            Assert.True(copy.ExitCode == 0, copy.ToString());
        }

        // Changes on both sides of 4 GiB: the clean run between them is one extent longer than 32 bits can say.
        await Trixie.RunCheckedAsync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x21 1M 64k", "-c", "write -z 5G 1M", "-c", "write -P 0x22 5200M 128k", image]);
        port = PeerServer.FreePort();
        JsonElement json;
        await using (var qemu = await StartTrixieQemuNbdAsync(["-r", "-f", "qcow2", "-B", Bitmap, image], port))
        {
            var uri = $"nbd://127.0.0.1:{port}/";
            var extended = await SpindleProcess.RunAsync("info", "--can", "extended", uri);
            Assert.True(extended.ExitCode == 0, "qemu-nbd 10 and spindle negotiate extended headers: " + extended);
            var copy = await SpindleProcess.RunAsync("copy", "--json", "--bitmap", Bitmap, uri, backup);
            Assert.True(copy.ExitCode == 0, copy.ToString());
            json = JsonDocument.Parse(copy.StandardOutput).RootElement.Clone();
        }

        // 64 KiB + 1 MiB + 128 KiB dirty at the bitmap's 64 KiB granularity; the 1 MiB of zeroes not read.
        Assert.Equal((64L << 10) + (1L << 20) + (128L << 10), json.GetProperty("dirty_bytes").GetInt64());
        Assert.Equal(1L << 20, json.GetProperty("zeroed_bytes").GetInt64());
        Assert.Equal(192L << 10, json.GetProperty("data_bytes").GetInt64());
        var compare = await Trixie.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", scratch.RootPath("backup.raw"), image]);
        Assert.True(compare.ExitCode == 0, compare.ToString());
    }

    /// <summary>A qcow2 image with data in the first 48 MiB and the bitmap added, and its full copy made by spindle copy.</summary>
    private static async Task<(string Image, string Backup)> FullBackupAsync(TempDirectory directory)
    {
        var image = await Qcow2Peers.Create(directory, "vm.qcow2", "cluster_size=65536", Size);
        await Qcow2Peers.Io(image, "qcow2", "write -P 0x11 0 48M");
        await Qcow2Peers.Img("bitmap", "--add", image, Bitmap);
        var backup = directory.File("backup.raw");
        var full = await SpindleProcess.RunAsync("copy", image, backup);
        Assert.True(full.ExitCode == 0, full.ToString());
        return (image, backup);
    }

    /// <summary>The dirty ranges of the bitmap as nbdinfo --map reads them (lines: offset length status description).</summary>
    private static async Task<List<(long Offset, long Length)>> DirtyRangesAsync(string uri)
    {
        var map = await Qcow2Peers.Output("nbdinfo", "--map=" + Context, uri);
        var ranges = map.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Where(fields => fields.Length >= 3 && fields[2] == "1")
            .Select(fields => (long.Parse(fields[0], CultureInfo.InvariantCulture), long.Parse(fields[1], CultureInfo.InvariantCulture)))
            .ToList();
        Assert.NotEmpty(ranges);
        return ranges;
    }

    private static async Task<string> ConvertToRawAsync(string image, TempDirectory directory)
    {
        var raw = directory.File("image.raw");
        await Qcow2Peers.Img("convert", "-f", "qcow2", "-O", "raw", image, raw);
        return raw;
    }

    private static long Field(string line, string name)
    {
        var start = line.IndexOf(name, StringComparison.Ordinal) + name.Length;
        var end = line.IndexOf(' ', start);
        return long.Parse(line[start..end], CultureInfo.InvariantCulture);
    }

    /// <summary>Debian 13's qemu-nbd on 127.0.0.1:<paramref name="port"/>, once it accepts (at most 30 s); stopped on dispose.</summary>
    private static async Task<TrixieServer> StartTrixieQemuNbdAsync(string[] arguments, int port)
    {
        var output = new List<string>();
        var process = Trixie.Start("qemu-nbd", ["--bind=127.0.0.1", "--port=" + port.ToString(CultureInfo.InvariantCulture), "--persistent", "--shared=8", .. arguments], line =>
        {
            lock (output)
            {
                output.Add(line);
            }
        });
        var server = new TrixieServer(process);
        var watch = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                using var probe = new TcpClient();
                await probe.ConnectAsync(IPAddress.Loopback, port, TestContext.Current.CancellationToken);
                return server;
            }
            catch (SocketException) when (!process.HasExited && watch.Elapsed < TimeSpan.FromSeconds(30))
            {
                await Task.Delay(100, TestContext.Current.CancellationToken);
            }
            catch (SocketException exception)
            {
                await server.DisposeAsync();
                lock (output)
                {
                    Assert.Fail($"qemu-nbd 10 is not serving ({exception.Message}; exited: {process.HasExited}):\n{string.Join('\n', output)}");
                }

                throw;
            }
        }
    }

    private sealed class TrixieServer(Process process) : IAsyncDisposable
    {
        public async ValueTask DisposeAsync()
        {
            await PeerTool.StopAsync(process);
            process.Dispose();
        }
    }
}
