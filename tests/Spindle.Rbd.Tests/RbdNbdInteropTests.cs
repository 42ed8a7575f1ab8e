using Spindle.Testing;
using Xunit;

namespace Spindle.Rbd.Tests;

/// <summary>
/// Spindle serving RBD images to real NBD clients (qemu-io, nbdcopy, nbdinfo, libnbd's python binding), with what
/// they wrote read back through Ceph's own tools (rbd export, python3-rbd), never through Spindle.
/// </summary>
public sealed class RbdNbdInteropTests(CephCluster cluster)
{
    private static readonly TimeSpan PeerTimeout = TimeSpan.FromSeconds(120);

    [Fact(Timeout = 180_000)]
    public async Task Every_command_from_qemu_io_lands_in_the_image_as_rbd_export_reads_it()
    {
        var image = await cluster.CreateImageAsync("qemuio");
        await using var server = await TestServer.StartAsync(cluster.Open(image));

        // WRITE, WRITE+FUA, WRITE_ZEROES with and without NO_HOLE (qemu sends NO_HOLE unless -u), TRIM, FLUSH,
        // concurrent aio writes, READ with verification, and BLOCK_STATUS (map).
        var result = await QemuIoAsync(server.Uri(),
            "write -P 0x5a 0 1M",
            "write -f -P 0x33 3145728 12345",
            "write -z 512 4096",
            "write -z -u 100000 70000",
            "write -P 0x44 8M 4M",
            "discard 8M 4M",
            "aio_write -P 0x71 16M 64k",
            "aio_write -P 0x72 17M 64k",
            "aio_write -P 0x73 18M 64k",
            "aio_flush",
            "flush",
            "read -P 0x5a 0 512",
            "read -P 0 512 4096",
            "read -P 0x5a 4608 95392",
            "read -P 0 100000 70000",
            "read -P 0x33 3145728 12345",
            "read -P 0 8M 4M",
            "read -P 0x72 17M 64k",
            "map");
        Assert.DoesNotContain("fail", result.StandardOutput + result.StandardError, StringComparison.OrdinalIgnoreCase);

        var expected = new byte[CephCluster.DefaultImageSize];
        expected.AsSpan(0, 1 << 20).Fill(0x5a);
        expected.AsSpan(3145728, 12345).Fill(0x33);
        expected.AsSpan(512, 4096).Clear();
        expected.AsSpan(100000, 70000).Clear();
        expected.AsSpan(16 << 20, 65536).Fill(0x71);
        expected.AsSpan(17 << 20, 65536).Fill(0x72);
        expected.AsSpan(18 << 20, 65536).Fill(0x73);

        // Read by Ceph's own exporter while Spindle still has the image open.
        var exported = await cluster.ExportAsync(image);
        AssertSame(expected, exported, "rbd export");
    }

    [Fact(Timeout = 180_000)]
    public async Task Nbdcopy_over_four_connections_writes_an_image_that_rbd_export_and_python3_rbd_read_back()
    {
        var image = await cluster.CreateImageAsync("nbdcopy");
        using var directory = new TempDirectory();
        var source = directory.File("source.img");
        var data = Patterns.Random((int)CephCluster.DefaultImageSize, seed: 11);

        // Leave some zero runs so nbdcopy's sparse detection (zeroing or trimming the destination) is exercised.
        data.AsSpan(8 << 20, 4 << 20).Clear();
        data.AsSpan((30 << 20) + 4096, 100_000).Clear();
        await File.WriteAllBytesAsync(source, data, TestContext.Current.CancellationToken);

        await using (var server = await TestServer.StartAsync(cluster.Open(image)))
        {
            await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", "--flush", source, server.Uri()], PeerTimeout);

            var back = directory.File("back.img");
            await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", server.Uri(), back], PeerTimeout);
            AssertSame(data, await File.ReadAllBytesAsync(back, TestContext.Current.CancellationToken), "nbdcopy back from Spindle");

            // python3-rbd reads while Spindle keeps the image open (and its exclusive lock).
            var middle = await cluster.PythonReadAsync(image, (30 << 20) - 777, 300_000);
            AssertSame(data.AsSpan((30 << 20) - 777, 300_000).ToArray(), middle, "python3-rbd");
        }

        AssertSame(data, await cluster.ExportAsync(image), "rbd export");
    }

    [Fact(Timeout = 120_000)]
    public async Task Nbdinfo_sees_multi_conn_every_write_flag_and_the_allocation_map()
    {
        var image = await cluster.CreateImageAsync("nbdinfo");
        await using var server = await TestServer.StartAsync(cluster.Open(image), description: "an rbd image");
        foreach (var flag in new[] { "--can=multi-conn", "--can=flush", "--can=fua", "--can=trim", "--can=zero", "--can=fast-zero", "--is=read-only" })
        {
            var check = await PeerTool.RunAsync("nbdinfo", [flag, server.Uri()], PeerTimeout);
            var expected = flag == "--is=read-only" ? 2 : 0;
            Assert.True(check.ExitCode == expected, $"nbdinfo {flag}: {check}");
        }

        await QemuIoAsync(server.Uri(), "write -P 0x10 20M 1M");
        var map = await PeerTool.RunCheckedAsync("nbdinfo", ["--map", server.Uri()], PeerTimeout);

        // Lines: offset length type description. The written megabyte must be inside a data extent; the last
        // object of the image was never written and is a hole.
        var extents = map.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Select(fields => (Offset: long.Parse(fields[0], System.Globalization.CultureInfo.InvariantCulture), Length: long.Parse(fields[1], System.Globalization.CultureInfo.InvariantCulture), Type: int.Parse(fields[2], System.Globalization.CultureInfo.InvariantCulture)))
            .ToList();
        Assert.Equal(CephCluster.DefaultImageSize, extents.Sum(e => e.Length));
        Assert.Contains(extents, e => e.Type == 0 && e.Offset <= 20 << 20 && e.Offset + e.Length >= 21 << 20);
        Assert.Contains(extents, e => e.Type == 3 && e.Offset + e.Length == CephCluster.DefaultImageSize);
    }

    [Fact(Timeout = 120_000)]
    public async Task A_snapshot_is_served_read_only_with_the_data_it_was_taken_with()
    {
        var image = await cluster.CreateImageAsync("snapserve");
        await using (var server = await TestServer.StartAsync(cluster.Open(image)))
        {
            await QemuIoAsync(server.Uri(), "write -P 0x61 0 2M");
        }

        await cluster.RbdAsync("snap", "create", image + "@gold");
        await using (var server = await TestServer.StartAsync(cluster.Open(image)))
        {
            await QemuIoAsync(server.Uri(), "write -P 0x62 0 2M");
        }

        await using var snapshot = await TestServer.StartAsync(cluster.Open(image + "@gold"));
        var readOnly = await PeerTool.RunAsync("nbdinfo", ["--is=read-only", snapshot.Uri()], PeerTimeout);
        Assert.True(readOnly.ExitCode == 0, $"the snapshot export must be read-only: {readOnly}");
        await QemuIoAsync(snapshot.Uri(), readOnly: true, "read -P 0x61 0 2M", "read -P 0 2M 1M");

        // BLOCK_STATUS describes the snapshot: what it holds is data, never a hole.
        var map = await PeerTool.RunCheckedAsync("nbdinfo", ["--map", snapshot.Uri()], PeerTimeout);
        var first = map.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries)[0].Split(' ', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(["0", "0"], new[] { first[0], first[2] });
        Assert.True(long.Parse(first[1], System.Globalization.CultureInfo.InvariantCulture) >= 2 << 20, map.StandardOutput);

        // A write is refused by the server with EPERM (libnbd's strict mode off, so it sends what it is told).
        const string script = """
            import sys, nbd
            h = nbd.NBD()
            h.set_strict_mode(0)
            h.connect_uri(sys.argv[1])
            try:
                h.pwrite(b"x" * 512, 0)
                print("written")
            except nbd.Error as e:
                print("errno", e.errno)
            """;
        var write = await PeerTool.RunPythonAsync(script, [snapshot.Uri()], PeerTimeout);
        Assert.True(write.ExitCode == 0, write.ToString());
        Assert.Equal("errno EPERM", write.StandardOutput.Trim());

        var exported = await cluster.ExportAsync(image + "@gold");
        Assert.True(exported.AsSpan(0, 2 << 20).IndexOfAnyExcept((byte)0x61) < 0);
    }

    [Fact(Timeout = 180_000)]
    public async Task Two_servers_on_one_image_see_one_disk()
    {
        var image = await cluster.CreateImageAsync("twoservers");

        // Two devices, two librados clients: as two Spindle processes on two machines would be.
        await using var first = await TestServer.StartAsync(cluster.Open(image));
        await using var second = await TestServer.StartAsync(cluster.Open(image));

        await QemuIoAsync(first.Uri(), "write -P 0x21 0 1M");
        await QemuIoAsync(second.Uri(), "read -P 0x21 0 1M", "write -P 0x22 1M 1M");
        await QemuIoAsync(first.Uri(), "read -P 0x22 1M 1M", "write -P 0x23 5M 64k");

        // A FLUSH on the second server covers a write acknowledged by the first (multi-conn across servers).
        const string script = """
            import sys, nbd
            a, b = nbd.NBD(), nbd.NBD()
            a.connect_uri(sys.argv[1])
            b.connect_uri(sys.argv[2])
            assert a.can_multi_conn() and b.can_multi_conn()
            a.pwrite(b"\x24" * 65536, 6 << 20)
            b.flush()
            assert b.pread(65536, 6 << 20) == b"\x24" * 65536
            b.pwrite(b"\x25" * 4096, (6 << 20) + 4096, nbd.CMD_FLAG_FUA)
            assert a.pread(4096, (6 << 20) + 4096) == b"\x25" * 4096
            print("ok")
            """;
        var result = await PeerTool.RunPythonAsync(script, [first.Uri(), second.Uri()], PeerTimeout);
        Assert.True(result.ExitCode == 0 && result.StandardOutput.Trim() == "ok", result.ToString());

        var exported = await cluster.ExportAsync(image);
        Assert.True(exported.AsSpan(0, 1 << 20).IndexOfAnyExcept((byte)0x21) < 0);
        Assert.True(exported.AsSpan(1 << 20, 1 << 20).IndexOfAnyExcept((byte)0x22) < 0);
        Assert.True(exported.AsSpan(5 << 20, 65536).IndexOfAnyExcept((byte)0x23) < 0);
        Assert.True(exported.AsSpan(6 << 20, 4096).IndexOfAnyExcept((byte)0x24) < 0);
        Assert.True(exported.AsSpan((6 << 20) + 4096, 4096).IndexOfAnyExcept((byte)0x25) < 0);
    }

    [Fact(Timeout = 120_000)]
    public async Task Write_zeroes_flags_over_NBD_FAST_ZERO_with_NO_HOLE_is_ENOTSUP_and_the_rest_zero()
    {
        var image = await cluster.CreateImageAsync("zeroflags");
        await using var server = await TestServer.StartAsync(cluster.Open(image));
        const string script = """
            import sys, nbd
            h = nbd.NBD()
            h.connect_uri(sys.argv[1])
            h.pwrite(b"\x99" * (1 << 20), 0)
            try:
                h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
                print("zeroed")
            except nbd.Error as e:
                print("errno", e.errno)
            assert h.pread(65536, 0) == b"\x99" * 65536, "a refused fast zero must not change the data"
            h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
            h.zero(1000, 70000, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
            assert h.pread(65536, 0) == bytes(65536)
            assert h.pread(1000, 70000) == bytes(1000)
            assert h.pread(1, 69999) == b"\x99" and h.pread(1, 71000) == b"\x99"
            h.shutdown()
            """;
        var result = await PeerTool.RunPythonAsync(script, [server.Uri()], PeerTimeout);
        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal("errno ENOTSUP", result.StandardOutput.Trim());
    }

    private static Task<ProcessResult> QemuIoAsync(string uri, params string[] commands) => QemuIoAsync(uri, readOnly: false, commands);

    private static async Task<ProcessResult> QemuIoAsync(string uri, bool readOnly, params string[] commands)
    {
        var arguments = new List<string> { "-f", "raw", uri };
        if (readOnly)
        {
            arguments.Insert(0, "-r");
        }

        foreach (var command in commands)
        {
            arguments.Add("-c");
            arguments.Add(command);
        }

        var result = await PeerTool.RunCheckedAsync("qemu-io", arguments, PeerTimeout);
        Assert.DoesNotContain("verification failed", result.StandardOutput + result.StandardError, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("error", result.StandardOutput + result.StandardError, StringComparison.OrdinalIgnoreCase);
        return result;
    }

    private static void AssertSame(byte[] expected, byte[] actual, string reader)
    {
        Assert.Equal(expected.Length, actual.Length);
        var mismatch = expected.AsSpan().CommonPrefixLength(actual);
        Assert.True(mismatch == expected.Length, $"{reader} differs from what was written at offset {mismatch}");
    }
}
