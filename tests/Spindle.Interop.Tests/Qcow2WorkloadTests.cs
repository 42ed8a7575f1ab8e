using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// Writes into a qcow2 image served by the real <c>spindle serve</c>, driven by qemu-io, nbdcopy and fio; then qemu
/// checks the image (qemu-img check) and reads back exactly what was written (qemu-img compare against a raw model
/// that qemu-io wrote with the same commands, or against the source nbdcopy copied).
/// </summary>
public sealed class Qcow2WorkloadTests
{
    private const long Size = 64L << 20;

    /// <summary>qemu-io commands: plain, FUA (-f), vectored, aio, zeroes with and without unmap, cluster-aligned discards, flushes.</summary>
    private static readonly string[] Patterns =
    [
        "write -P 0x11 0 1M",
        "write -f -P 0x12 1536k 12k",
        "writev -P 0x13 3M 4k 8k 512 3584",
        "aio_write -P 0x14 5M 64k",
        "aio_write -P 0x15 5184k 1k",
        "aio_flush",
        "write -P 0x16 65535 3",
        "write -z 8M 1M",
        "write -z -u 9M 2M",
        "write -P 0x17 10M 100k",
        "discard 12M 2M",
        "write -P 0x18 13M 4k",
        "write -z 0 4k",
        "write -P 0x19 20M 8M",
        "discard 22M 2M",
        "write -z -f 24M 64k",
        "write -P 0x1a 40M 1",
        "write -P 0x1b 63M 1M",
        "flush",
    ];

    public static TheoryData<string, bool> Images => new()
    {
        { "compat=1.1,cluster_size=65536", false },
        { "compat=0.10,cluster_size=4096", false },
        { "compat=1.1,cluster_size=512,refcount_bits=1", false },
        { "compat=1.1,cluster_size=65536,extended_l2=on", true },
        { "compat=1.1,cluster_size=2097152,lazy_refcounts=on", true },
    };

    [Theory]
    [MemberData(nameof(Images))]
    public async Task Qemu_io_patterns_through_spindle_read_back_exactly_and_check_clean(string options, bool backing)
    {
        using var directory = new TempDirectory();
        var model = directory.File("model.raw");
        await Qcow2Peers.Img("create", "-q", "-f", "raw", model, Size.ToString(CultureInfo.InvariantCulture));
        var extra = new List<string>();
        if (backing)
        {
            var basePath = directory.File("base.raw");
            await Qcow2Peers.Img("create", "-q", "-f", "raw", basePath, Size.ToString(CultureInfo.InvariantCulture));
            await Qcow2Peers.Io(basePath, "raw", "write -P 0xbb 0 64M");
            await Qcow2Peers.Io(model, "raw", "write -P 0xbb 0 64M");
            extra.AddRange(["-b", "base.raw", "-F", "raw"]);
        }

        var image = await Qcow2Peers.Create(directory, "disk.qcow2", options, Size, [.. extra]);
        await Qcow2Peers.Io(model, "raw", Patterns);
        await using (var spindle = await Qcow2Peers.Serve(image))
        {
            await Qcow2Peers.Io(spindle.Uri!, "raw", Patterns);
            await Qcow2Peers.Io(spindle.Uri!, "raw", "read -P 0x12 1536k 12k", "read -P 0x19 20M 2M", "read -P 0 22M 2M", "read -P 0x19 21M 1M", "read -P 0 24M 64k");
            Assert.True(await Qcow2Peers.Same(spindle.Uri!, "raw", model, "raw"), "what Spindle serves differs from the model");
            Assert.Equal(0, await spindle.StopAsync());
        }

        await Qcow2Peers.AssertClean(image, allowLeaks: false);
        Assert.True(await Qcow2Peers.Same(image, "qcow2", model, "raw"), "what qemu reads from the image differs from the model");
    }

    [Fact]
    public async Task Nbdcopy_copies_into_and_out_of_a_served_qcow2_over_several_connections()
    {
        using var directory = new TempDirectory();
        var source = directory.File("source.raw");
        await Qcow2Peers.Img("create", "-q", "-f", "raw", source, "128M");
        var commands = Enumerable.Range(0, 40).Select(i => $"write -P {(i * 7) & 0xff} {i * 3}M {(i % 5) + 1}00k").ToArray();
        await Qcow2Peers.Io(source, "raw", commands);
        var image = await Qcow2Peers.Create(directory, "disk.qcow2", "cluster_size=65536", 128L << 20);

        await using (var spindle = await Qcow2Peers.Serve(image))
        {
            var info = await Qcow2Peers.Output("nbdinfo", spindle.Uri!);
            Assert.Contains("can_multi_conn: true", info, StringComparison.Ordinal);
            await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", "--requests=16", source, spindle.Uri!], TimeSpan.FromSeconds(300));
            var back = directory.File("back.raw");
            await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", spindle.Uri!, back], TimeSpan.FromSeconds(300));
            Assert.True(await Qcow2Peers.Same(back, "raw", source, "raw"));
            Assert.Equal(0, await spindle.StopAsync());
        }

        await Qcow2Peers.AssertClean(image, allowLeaks: false);
        Assert.True(await Qcow2Peers.Same(image, "qcow2", source, "raw"));

        // nbdcopy skips the holes it is told about: the qcow2 image stays sparse.
        var map = await Qcow2Peers.Map(image, "qcow2");
        Assert.Contains(map, run => !run.Data && run.Length >= 1 << 20);
    }

    [Fact]
    public async Task Fio_random_writes_with_verification_then_qemu_checks_and_reads_them()
    {
        PeerTool.Require("fio");
        using var directory = new TempDirectory();
        var image = await Qcow2Peers.Create(directory, "disk.qcow2", "cluster_size=65536", Size);
        await using (var spindle = await Qcow2Peers.Serve(image))
        {
            // Two jobs (two connections) of mixed-size random writes, each verified by reading back (crc32c).
            var result = await PeerTool.RunAsync("fio",
            [
                "--name=qcow2", "--ioengine=nbd", "--uri=" + spindle.Uri!, "--rw=randwrite", "--bssplit=4k/50:16k/20:64k/20:256k/10",
                "--iodepth=16", "--numjobs=2", "--size=32M", "--offset_increment=32M", "--verify=crc32c", "--verify_fatal=1",
                "--do_verify=1", "--fsync=64", "--randrepeat=0", "--output-format=json",
            ], TimeSpan.FromSeconds(300));
            Assert.True(result.ExitCode == 0, result.ToString());
            Assert.Contains("\"error\" : 0", result.StandardOutput, StringComparison.Ordinal);

            // What fio left is what qemu reads from the file, once Spindle has put it all on disk.
            var served = directory.File("served.raw");
            await PeerTool.RunCheckedAsync("nbdcopy", [spindle.Uri!, served], TimeSpan.FromSeconds(300));
            Assert.Equal(0, await spindle.StopAsync());
            await Qcow2Peers.AssertClean(image, allowLeaks: false);
            Assert.True(await Qcow2Peers.Same(image, "qcow2", served, "raw"));
        }
    }
}
