using System.Globalization;
using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>
/// Spindle's own <c>spindle attach</c> in the guest, on the kernel's nbd driver, against <c>spindle serve</c> on the
/// host that the test kills (SIGKILL) and restarts while the guest writes files with fsync: no write may fail,
/// the file system must be clean and every file must hold what was written, read back in the guest and dumped
/// from the server's image on the host. Then the server is killed for good (I/O must fail with EIO, not hang) and
/// started again (the device must work again), and the device is detached.
/// </summary>
[Collection(KernelVmCollection.Name)]
public sealed class SpindleDeviceTests(KernelVm vm)
{
    private const long Size = 256 * MiB;
    private const int Kills = 4;
    private const string Uuid = "5a1e0b6c-7d3e-4f10-9a2b-0c1d2e3f4a5b";

    /// <summary>
    /// Direct: the kernel holds the TCP connection; the attach daemon hands it a new one after each restart. The
    /// daemon itself is also killed and a new one adopts the device; after another server restart it reconnects.
    /// </summary>
    [Fact]
    public async Task Direct_device_survives_server_kills_and_its_own_restart_and_fails_with_EIO_when_the_server_stays_dead()
    {
        var report = await RunAsync(relay: false, tls: false);
        Assert.Equal("direct", report.Result("mode"));
        report.AssertSucceeded("daemon_killed_write", "adopt", "adopted_write");
        Assert.Equal("ok", report.Result("control_adopted_kill"));
        Assert.Matches("/run/spindle/by-uuid/" + Uuid, report.Result("links"));
    }

    /// <summary>Relay with TLS: the kernel talks to the attach daemon over a socket pair; the client carries TLS and replay.</summary>
    [Fact]
    public async Task Relay_device_over_TLS_survives_server_kills_and_fails_with_EIO_when_the_server_stays_dead()
    {
        var report = await RunAsync(relay: true, tls: true);
        Assert.Equal("relay", report.Result("mode"));
    }

    private async Task<VmReport> RunAsync(bool relay, bool tls)
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", Size);
        var files = new Dictionary<string, byte[]>();
        List<string> serverArguments = ["--name", "disk", "--uuid", Uuid, "--label", "spindle-test", "--serial", "S123", "--state-dir", directory.Path, image];
        var query = string.Empty;
        if (tls)
        {
            var certificates = directory.File("tls");
            var made = await PeerTool.RunAsync(Path.Combine(vm.ScriptDirectory, "..", "make-certs.sh"), [certificates, "localhost"]);
            Assert.True(made.ExitCode == 0, made.ToString());
            serverArguments.AddRange(["--tls-certificates", certificates, "--tls", "require"]);
            foreach (var name in new[] { "ca-cert.pem", "client-cert.pem", "client-key.pem" })
            {
                files["tls/" + name] = await File.ReadAllBytesAsync(Path.Combine(certificates, name));
            }

            query = "?tls-certificates=/scenario/tls&tls-hostname=localhost";
        }

        await using var server = new HostServer(PeerServer.FreePort(), serverArguments);
        await server.StartAsync();
        var kills = 0;
        var random = new Random(7);
        await using var control = new ControlChannel(async command =>
        {
            switch (command)
            {
                case "kills":
                    // Writes are going on: kill the server now and then, and start it again 0.3-1 s later.
                    for (var i = 0; i < Kills; i++)
                    {
                        await Task.Delay(TimeSpan.FromSeconds(2 + random.NextDouble()));
                        await server.KillAsync();
                        kills++;
                        await Task.Delay(TimeSpan.FromSeconds(0.3 + (0.7 * random.NextDouble())));
                        await server.StartAsync();
                    }

                    await Task.Delay(TimeSpan.FromSeconds(3));
                    return $"ok {Kills}";
                case "kill":
                    await server.KillAsync();
                    kills++;
                    await Task.Delay(TimeSpan.FromSeconds(1));
                    await server.StartAsync();
                    return "ok";
                case "stop":
                    await server.KillAsync();
                    kills++;
                    return "ok";
                case "start":
                    await server.StartAsync();
                    return "ok";
                default:
                    return "unknown";
            }
        });

        var uri = $"{(tls ? "nbds" : "nbd")}://{KernelVm.HostAddress}:{server.Port}/disk{query}";
        // Direct: a short request timeout bounds the stall of a restart. The relay keeps its default (the dead
        // timeout plus a minute): its socket never dies with the server, the client below waits and replays.
        var mode = relay ? "--relay" : "--io-timeout 5";
        var script = Scenario.Replace("@CONTROL@", control.Port.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal)
            .Replace("@ATTACH@", $"spindle attach --device nbd {mode} --dead-timeout 8 --name disk '{uri}'", StringComparison.Ordinal)
            .Replace("@ADOPT@", relay ? "false" : "true", StringComparison.Ordinal);
        var report = await vm.RunAsync(script, files, extraInitrds: [await vm.SpindleInitrdAsync()], limit: TimeSpan.FromMinutes(8));
        await server.DisposeAsync();
        Assert.Empty(control.Failures);

        report.AssertCompleted();
        report.AssertSucceeded("modules", "attach", "mkfs", "mount", "umount", "fsck", "remount", "umount_again", "recovered", "detach");
        Assert.Equal($"ok {Kills}", report.Result("control_kills"));
        Assert.Equal(0, report.ResultInt64("write_errors"));
        var written = report.Result("filelist").Split(';', StringSplitOptions.RemoveEmptyEntries).Select(line => line.Split(' ')).ToList();
        Assert.True(written.Count >= 10, $"only {written.Count} files were written");
        Assert.Equal(written.Count, report.ResultInt64("files"));
        Assert.Equal(0, report.ResultInt64("mismatches"));

        // The dead server: the read fails with EIO (dd reports it), within the request timeout plus the dead timeout
        // (and TCG's slowness), rather than hanging; once the server is back, the device works again.
        Assert.NotEqual(0, report.StepExitCode("dead_read"));
        Assert.Contains("Input/output error", report.StepOutput("dead_read"), StringComparison.Ordinal);
        Assert.Equal("0", report.Result("size_after_detach"));

        // On the host: the image is a clean ext4 holding every file with the bytes the guest wrote.
        var fsck = await PeerTool.RunAsync("e2fsck", ["-f", "-n", image]);
        Assert.True(fsck.ExitCode == 0, fsck.ToString());
        await AssertFilesInImageAsync(image, written, directory);

        var output = TestContext.Current.TestOutputHelper;
        output?.WriteLine($"{report.Result("mode")}: {kills} server kills, {written.Count} files ({report.Result("megabytes")} MB) written with fsync and verified; " +
            $"longest write+fsync {report.Result("longest_write")} s, median {report.Result("median_write")} s; EIO after {report.Result("eio_seconds")} s of a dead server; VM {report.Elapsed.TotalSeconds:F0} s");
        return report;
    }

    /// <summary>Dumps every file from the image with debugfs (no kernel, no Spindle) and compares its SHA-256.</summary>
    private static async Task AssertFilesInImageAsync(string image, List<string[]> written, TempDirectory directory)
    {
        var dumps = directory.File("dumps");
        Directory.CreateDirectory(dumps);
        var commands = directory.File("debugfs.cmd");
        await File.WriteAllLinesAsync(commands, written.Select(file => $"dump /{file[0]} {Path.Combine(dumps, file[0])}"));
        var debugfs = await PeerTool.RunAsync("debugfs", ["-f", commands, image], TimeSpan.FromMinutes(2));
        Assert.True(debugfs.ExitCode == 0, debugfs.ToString());
        foreach (var file in written)
        {
            Assert.Equal(file[1], await Sha256Async(Path.Combine(dumps, file[0])));
        }
    }

    /// <summary>
    /// The guest's side. @CONTROL@ is the host's control port, @ATTACH@ the attach command, @ADOPT@ whether to test
    /// the daemon's restart. Every file is written from a file in memory with dd conv=fsync (write, then fsync), its
    /// SHA-256 and the time write+fsync took recorded.
    /// </summary>
    private const string Scenario = """
        export PATH=/usr/local/bin:$PATH
        control() { echo "$1" | nc 10.0.2.2 @CONTROL@; }
        now() { cut -d' ' -f1 /proc/uptime; }
        step modules sh -c 'modprobe crc32c_generic && modprobe ext4'
        step attach @ATTACH@
        report mode "$(sed -n 's/.*"mode": "\([a-z]*\)".*/\1/p' /run/spindle/disk.json)"
        report links "$(ls -d /run/spindle/by-*/* 2>&1 | tr '\n' ' ')"
        report backend "$(cat /sys/block/nbd0/backend)"
        # The file system takes the first 160 MiB only: the raw writes of the adoption part below go to 187-213 MiB
        # and must not overwrite the files the host checks in the image afterwards. At most 200 files (about 100 MB).
        step mkfs mkfs.ext4 -q -F -b 4096 /dev/nbd0 160M
        step mount mount -t ext4 /dev/nbd0 /mnt
        writer() {
          i=0
          : >/tmp/files
          while [ ! -e /tmp/stop ] && [ $i -lt 200 ]; do
            i=$((i + 1))
            size=$(( $(od -An -N2 -tu2 /dev/urandom) * 16 + 1 ))
            head -c $size /dev/urandom >/tmp/data
            start=$(now)
            dd if=/tmp/data of=/mnt/f$i bs=64k conv=fsync 2>/tmp/dd.err || echo "f$i: $(cat /tmp/dd.err)" >>/tmp/errors
            end=$(now)
            echo "f$i $(sha256sum </tmp/data | cut -d' ' -f1) $(awk "BEGIN { print $end - $start }") $size" >>/tmp/files
          done
        }
        writer &
        writer_pid=$!
        sleep 2
        report control_kills "$(control kills)"
        touch /tmp/stop
        wait $writer_pid
        [ -f /tmp/errors ] && sed 's/^/[write error] /' /tmp/errors
        report write_errors "$(cat /tmp/errors 2>/dev/null | wc -l)"
        report files "$(wc -l </tmp/files)"
        report megabytes "$(awk '{ s += $4 } END { printf "%.0f", s / 1000000 }' /tmp/files)"
        report longest_write "$(sort -k3 -g -r /tmp/files | head -n 1 | cut -d' ' -f3)"
        report median_write "$(sort -k3 -g /tmp/files | awk '{ a[NR] = $3 } END { print a[int((NR + 1) / 2)] }')"
        report filelist "$(cut -d' ' -f1,2 /tmp/files | tr '\n' ';')"
        step umount umount /mnt
        step fsck fsck.ext4 -f -n /dev/nbd0
        echo 3 >/proc/sys/vm/drop_caches
        step remount mount -t ext4 -o ro /dev/nbd0 /mnt
        bad=0
        while read name sha took size; do
          [ "$(sha256sum </mnt/$name | cut -d' ' -f1)" = "$sha" ] || bad=$((bad + 1))
        done </tmp/files
        report mismatches $bad
        step umount_again umount /mnt
        if @ADOPT@; then
          # The attach daemon dies: the kernel keeps the device and its connection; a new daemon adopts it and
          # replaces the connection after the next server restart.
          kill -9 "$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' /run/spindle/disk.json)"
          step daemon_killed_write dd if=/dev/urandom of=/dev/nbd0 bs=1M count=4 seek=200 oflag=direct
          step adopt spindle attach --adopt /dev/nbd0
          dd if=/dev/urandom of=/dev/nbd0 bs=64k count=400 seek=3000 oflag=direct,dsync 2>/tmp/adopted.err &
          writer_pid=$!
          report control_adopted_kill "$(control kill)"
          wait $writer_pid
          echo $? >/tmp/adopted.rc
          cat /tmp/adopted.err
          step adopted_write sh -c 'exit $(cat /tmp/adopted.rc)'
          grep -E 'adopted|new connection' /run/spindle/disk.log | tail -n 3
        fi
        # A server that stays dead: a read fails with EIO after the timeouts instead of hanging.
        report control_stop "$(control stop)"
        start=$(now)
        step dead_read dd if=/dev/nbd0 of=/dev/null bs=4k count=1 skip=4321 iflag=direct
        report eio_seconds "$(awk "BEGIN { print $(now) - $start }")"
        report control_start "$(control start)"
        step recovered wait_until 60 dd if=/dev/nbd0 of=/dev/null bs=4k count=1 skip=4322 iflag=direct
        sed 's/^/[attach log] /' /run/spindle/disk.log | tail -n 40
        step detach spindle detach disk
        report size_after_detach "$(cat /sys/block/nbd0/size)"
        """;
}
