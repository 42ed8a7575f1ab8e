using System.Globalization;
using System.Text;
using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>
/// The same fio workloads on /dev/nbdN attached three ways against one <c>spindle serve</c> on the host: by
/// <c>spindle attach</c> direct (the kernel holds the TCP connection), by <c>spindle attach --relay</c> (the kernel
/// talks to the attach daemon over a socket pair, Spindle's client carries the requests) and by the reference
/// <c>nbd-client</c>. The figures are recorded in the test output, never asserted (they measure the emulator as
/// much as anything under TCG); what is asserted is that every run moved data and that a verifying write job read
/// back what it wrote on each device.
/// </summary>
[Collection(KernelVmCollection.Name)]
public sealed class FioComparisonTests(KernelVm vm)
{
    private const long Size = 512 * MiB;
    private const int SecondsPerJob = 5;

    /// <summary>The workloads of tests/Spindle.Fuse.Tests/bench/fio-devices.sh: direct I/O, libaio.</summary>
    private static readonly (string Pattern, string BlockSize, int Depth)[] Jobs =
        [("write", "1M", 16), ("read", "1M", 16), ("randwrite", "4k", 32), ("randread", "4k", 32)];

    private static readonly string[] Modes = ["direct", "relay", "nbd_client"];

    [Fact]
    public async Task Fio_runs_the_same_workloads_on_spindle_attach_direct_and_relay_and_on_nbd_client_devices()
    {
        using var directory = new TempDirectory();
        var image = directory.File("disk.img");
        // Data on the first 128 MiB (what the jobs touch), so no mode pays for allocating the file's blocks.
        await using (var stream = File.Create(image))
        {
            var block = new byte[MiB];
            new Random(3).NextBytes(block);
            for (var i = 0; i < 128; i++)
            {
                await stream.WriteAsync(block);
            }

            stream.SetLength(Size);
        }

        await using var server = new HostServer(PeerServer.FreePort(), ["--name", "disk", image]);
        await server.StartAsync();
        var uri = $"nbd://{KernelVm.HostAddress}:{server.Port}/disk";
        var jobs = string.Join(' ', Jobs.Select(job => $"{job.Pattern}:{job.BlockSize}:{job.Depth}"));
        var script = Scenario.Replace("@URI@", uri, StringComparison.Ordinal)
            .Replace("@PORT@", server.Port.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal)
            .Replace("@JOBS@", jobs, StringComparison.Ordinal)
            .Replace("@SECONDS@", SecondsPerJob.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal);
        var report = await vm.RunAsync(script, memory: "1G", extraInitrds: [await vm.SpindleInitrdAsync(), await vm.FioInitrdAsync()],
            limit: TimeSpan.FromMinutes(8));
        await server.DisposeAsync();

        report.AssertCompleted();
        report.AssertSucceeded("attach_direct", "verify_direct", "detach_direct", "attach_relay", "verify_relay", "detach_relay",
            "attach_nbd_client", "verify_nbd_client", "detach_nbd_client");
        Assert.Equal("direct", report.Result("mode_direct"));
        Assert.Equal("relay", report.Result("mode_relay"));

        var table = new StringBuilder();
        table.AppendLine(CultureInfo.InvariantCulture, $"fio in the guest ({vm.KernelPackage}, 1 CPU, TCG or KVM as run.sh chose), {SecondsPerJob} s per job, O_DIRECT, libaio:");
        table.AppendLine(CultureInfo.InvariantCulture, $"{"job",-16} {"spindle direct",22} {"spindle relay",22} {"nbd-client",22}");
        foreach (var (pattern, blockSize, depth) in Jobs)
        {
            var line = new StringBuilder(string.Create(CultureInfo.InvariantCulture, $"{pattern + " " + blockSize + " qd" + depth,-16}"));
            foreach (var mode in Modes)
            {
                // "IO_KIB BW_KIB_S IOPS" of the side the job used (fio --minimal).
                var figures = report.Result($"fio_{mode}_{pattern}").Split(' ');
                Assert.Equal(3, figures.Length);
                Assert.True(long.Parse(figures[0], CultureInfo.InvariantCulture) > 0, $"{mode} {pattern} moved no data: {string.Join(' ', figures)}");
                var mebibytes = double.Parse(figures[1], CultureInfo.InvariantCulture) / 1024;
                var iops = double.Parse(figures[2], CultureInfo.InvariantCulture);
                line.Append(CultureInfo.InvariantCulture, $" {mebibytes,8:F1} MiB/s {iops,7:F0} IOPS");
            }

            table.AppendLine(line.ToString());
        }

        TestContext.Current.TestOutputHelper?.WriteLine(table.ToString());
    }

    /// <summary>
    /// The guest's side: for each mode, attach, run every job (fio --minimal: field 6/47 are the read/write KiB
    /// moved, 7/48 the bandwidth in KiB/s, 8/49 the IOPS), a verifying random write, and detach. Each mode gets a
    /// device of its own (nbd0, nbd1, nbd2), so none inherits another's queue settings.
    /// </summary>
    private const string Scenario = """
        export PATH=/usr/local/bin:$PATH
        fio_jobs() { # MODE DEVICE
          for job in @JOBS@; do
            rw=${job%%:*}; rest=${job#*:}; bs=${rest%%:*}; depth=${rest#*:}
            fio --name=$1-$rw --filename=$2 --rw=$rw --bs=$bs --iodepth=$depth --direct=1 --ioengine=libaio --thread \
              --size=128M --runtime=@SECONDS@ --time_based --minimal >/tmp/fio.out 2>/tmp/fio.err || sed 's/^/[fio error] /' /tmp/fio.err
            case $rw in
              *write) figures=$(awk -F';' '{ print $47, $48, $49 }' /tmp/fio.out) ;;
              *) figures=$(awk -F';' '{ print $6, $7, $8 }' /tmp/fio.out) ;;
            esac
            report fio_$1_$rw "$figures"
          done
          step verify_$1 fio --name=$1-verify --filename=$2 --rw=randwrite --bs=4k --iodepth=16 --direct=1 --ioengine=libaio \
            --thread --offset=256M --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1
        }
        step attach_direct spindle attach --device nbd --nbd 0 --name fio-direct @URI@
        report mode_direct "$(sed -n 's/.*"mode": "\([a-z]*\)".*/\1/p' /run/spindle/fio-direct.json)"
        fio_jobs direct /dev/nbd0
        step detach_direct spindle detach fio-direct
        step attach_relay spindle attach --device nbd --relay --nbd 1 --name fio-relay @URI@
        report mode_relay "$(sed -n 's/.*"mode": "\([a-z]*\)".*/\1/p' /run/spindle/fio-relay.json)"
        fio_jobs relay /dev/nbd1
        step detach_relay spindle detach fio-relay
        step attach_nbd_client nbd-client 10.0.2.2 @PORT@ /dev/nbd2 -N disk
        fio_jobs nbd_client /dev/nbd2
        step detach_nbd_client nbd-client -d /dev/nbd2
        """;
}
