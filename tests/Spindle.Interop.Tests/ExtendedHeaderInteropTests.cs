using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Spindle.Client;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// NBD extended headers against the peers that speak them: libnbd 1.22 (nbdsh) and qemu 10 (qemu-img, qemu-io,
/// qemu-nbd) from the Debian 13 root (scripts/trixie-root.sh). Spindle's server listens on loopback TCP, which the
/// chroot shares; the recording device shows on the server side what each request really was.
/// </summary>
public sealed class ExtendedHeaderInteropTests
{
    private const long Big = 8L << 40;
    private const long GiB = 1L << 30;

    [Fact]
    public async Task Nbdsh_with_extended_headers_drives_every_command_and_sends_more_than_4_GiB_in_one_request()
    {
        var device = new RecordingBlockDevice(new MemoryBlockDevice(Big));
        await using var server = await TestServer.StartAsync(device, "big");
        var script = $$"""
            import nbd
            h.set_request_extended_headers(True)
            h.add_meta_context("base:allocation")
            h.connect_uri("{{server.Uri("big")}}")
            print("extended", h.get_extended_headers_negotiated())
            print("payload", h.can_block_status_payload())
            print("size", h.get_size())
            pattern = bytes(range(256)) * 256
            h.pwrite(pattern, 5 * 2**30)
            h.pwrite(pattern, 7 * 2**30, nbd.CMD_FLAG_FUA)
            print("read", h.pread(len(pattern), 5 * 2**30) == pattern)
            h.flush()
            h.cache(2**20, 0)
            h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)
            runs = []
            h.block_status_64(6 * 2**30, 4 * 2**30, lambda ctx, offset, entries, err: runs.extend(entries) or 0)
            print("status", ";".join("%d/%d" % e for e in runs))
            h.trim(6 * 2**30, 4 * 2**30)
            print("trimmed", h.pread(len(pattern), 7 * 2**30) == bytes(len(pattern)))
            h.zero(5 * 2**30, 4 * 2**30)
            print("zeroed", h.pread(len(pattern), 5 * 2**30) == bytes(len(pattern)))
            h.shutdown()
            """;
        var result = await Trixie.RunCheckedAsync("nbdsh", ["-c", script], TimeSpan.FromSeconds(120));
        var lines = result.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Contains("extended True", lines);
        Assert.Contains("payload True", lines);
        Assert.Contains($"size {Big}", lines);
        Assert.Contains("read True", lines);
        Assert.Contains("trimmed True", lines);
        Assert.Contains("zeroed True", lines);

        // One BLOCK_STATUS for 6 GiB from 4 GiB: hole to 5 GiB, the 64 KiB written, hole to 7 GiB, data, hole (the
        // last extent may run past the request).
        var status = Assert.Single(lines, l => l.StartsWith("status ", StringComparison.Ordinal))["status ".Length..].Split(';');
        Assert.Equal(["1073741824/3", "65536/0", "2147418112/3", "65536/0"], status[..4]);

        // The server saw one request each (libnbd's order is count, offset): a 6 GiB TRIM and a 5 GiB WRITE_ZEROES, not
        // pieces of 4 GiB at most.
        Assert.Contains(new Operation(OperationKind.Trim, 4 * GiB, 6 * GiB, false), device.OfKind(OperationKind.Trim));
        Assert.Contains(device.OfKind(OperationKind.WriteZeroes), o => o.Offset == 4 * GiB && o.Length == 5 * GiB);
        Assert.Contains(device.OfKind(OperationKind.Write), o => o.Offset == 7 * GiB && o.Fua);
        Assert.Contains(device.OfKind(OperationKind.WriteZeroes), o => o.Offset == 0 && o.Length == 65536 && (o.ZeroFlags & ZeroFlags.NoHole) != 0);
        Assert.NotEmpty(device.OfKind(OperationKind.Flush));
        Assert.NotEmpty(device.OfKind(OperationKind.Cache));
        Assert.True(server.Logs.Contains("extended headers True"), "the server did not log extended headers");
    }

    [Fact]
    public async Task Qemu_10_converts_and_reads_through_spindle_with_extended_headers()
    {
        using var scratch = Trixie.CreateScratch();
        var source = Patterns.Generate(0, 8 << 20);
        Array.Clear(source, 2 << 20, 3 << 20); // a zero run qemu-img may skip
        await File.WriteAllBytesAsync(scratch.HostPath("source.raw"), source);
        var memory = new MemoryBlockDevice(8 << 20);
        await using var server = await TestServer.StartAsync(memory, "disk");
        var target = "nbd://127.0.0.1:" + server.Port.ToString(System.Globalization.CultureInfo.InvariantCulture) + "/disk";

        await Trixie.RunCheckedAsync("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", scratch.RootPath("source.raw"), target], TimeSpan.FromSeconds(120));
        var copy = new byte[source.Length];
        await memory.ReadAsync(0, copy, CancellationToken.None);
        Assert.Equal(source, copy);

        var io = await Trixie.RunCheckedAsync("qemu-io", ["-f", "raw", target,
            "-c", "write -P 0x5a 1M 64k",
            "-c", "read -P 0x5a 1M 64k",
            "-c", "write -z 6M 1M",
            "-c", "read -P 0 6M 1M",
            "-c", "discard 7M 1M",
            "-c", "flush"], TimeSpan.FromSeconds(60));
        Assert.DoesNotContain("Pattern verification failed", io.StandardOutput, StringComparison.Ordinal);
        var compare = await Trixie.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", target, scratch.RootPath("source.raw")], TimeSpan.FromSeconds(60));
        Assert.Equal(1, compare.ExitCode); // differs where qemu-io wrote, and says where
        Assert.Contains("Content mismatch at offset 1048576", compare.StandardOutput, StringComparison.Ordinal);

        // Every qemu connection negotiated extended headers, none fell back.
        Assert.True(server.Logs.Contains("extended headers True"), "qemu did not negotiate extended headers");
        Assert.False(server.Logs.Contains("extended headers False"), "a qemu connection did not negotiate extended headers");
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Spindle_client_against_qemu_nbd_10_with_and_without_extended_headers(bool extended)
    {
        using var scratch = Trixie.CreateScratch();
        var image = scratch.HostPath("big.raw");
        await using (var file = new FileStream(image, FileMode.CreateNew))
        {
            file.SetLength(6 * GiB);
        }

        var port = FreePort();
        var output = new List<string>();
        using var qemu = Trixie.Start("qemu-nbd", ["--format=raw", "--bind=127.0.0.1", "--port=" + port, "--persistent", "--shared=4", "--discard=unmap", scratch.RootPath("big.raw")], line =>
        {
            lock (output)
            {
                output.Add(line);
            }
        });
        try
        {
            var options = new NbdClientOptions { ExtendedHeaders = extended, DeadConnectionTimeout = TimeSpan.Zero };
            await using var client = await ConnectWhenListeningAsync(NbdUri.Parse($"nbd://127.0.0.1:{port}/"), options, qemu, output);
            Assert.Equal(extended, client.Export.ExtendedHeaders);
            Assert.True(client.Export.StructuredReplies);
            var data = Patterns.Generate(5 * GiB, 1 << 20);
            await client.WriteAsync(5 * GiB, data);
            var back = new byte[data.Length];
            await client.ReadAsync(5 * GiB, back);
            Assert.Equal(data, back);

            // Allocation in one call over the whole 6 GiB (split into 32-bit requests by the client without them).
            var extents = new List<NbdExtent>();
            await foreach (var extent in client.GetExtentsAsync(0, 6 * GiB))
            {
                extents.Add(extent);
            }

            Assert.Equal(6 * GiB, extents.Sum(e => e.Length));
            Assert.Contains(extents, e => !e.IsHole && e.Offset <= 5 * GiB && e.End >= (5 * GiB) + (1 << 20));
            Assert.True(extents.Where(e => e.End <= 5 * GiB).All(e => e.IsZero));

            // A 5 GiB WRITE_ZEROES and TRIM in one call each.
            await client.WriteZeroesAsync(GiB, 5 * GiB);
            await client.ReadAsync(5 * GiB, back);
            Assert.Equal(new byte[back.Length], back);
            await client.WriteAsync(0, data);
            await client.TrimAsync(0, 5 * GiB);
            await client.FlushAsync();
        }
        finally
        {
            await PeerTool.StopAsync(qemu);
        }

        // The zeroes reached the image qemu-nbd served: where the data was written at 5 GiB, zeroes now.
        await using var check = new FileStream(image, FileMode.Open, FileAccess.Read);
        check.Position = 5 * GiB;
        var written = new byte[1 << 20];
        check.ReadExactly(written);
        Assert.Equal(new byte[written.Length], written);
        Assert.Equal(6 * GiB, check.Length);
    }

    private static async Task<NbdClient> ConnectWhenListeningAsync(NbdUri uri, NbdClientOptions options, Process server, List<string> output)
    {
        var watch = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                return await NbdClient.ConnectAsync(uri, options);
            }
            catch (NbdConnectionException) when (!server.HasExited && watch.Elapsed < TimeSpan.FromSeconds(30))
            {
                await Task.Delay(100);
            }
            catch (NbdConnectionException exception)
            {
                lock (output)
                {
                    Assert.Fail($"qemu-nbd is not serving ({exception.Message}; exited: {server.HasExited}):\n{string.Join('\n', output)}");
                }

                throw;
            }
        }
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}
