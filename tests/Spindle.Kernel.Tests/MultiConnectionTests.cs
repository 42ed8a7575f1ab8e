using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;
using static Spindle.Kernel.Tests.HostImage;

namespace Spindle.Kernel.Tests;

/// <summary>
/// nbd-client -C 4: one device over four TCP connections, which the kernel allows only with NBD_FLAG_CAN_MULTI_CONN.
/// The guest has four CPUs so blk-mq makes four hardware queues, one per connection, and each writer is pinned to a
/// CPU: every connection carries requests, which the host's own TCP counters confirm.
/// </summary>
[Collection(KernelVmCollection.Name)]
public sealed class MultiConnectionTests(KernelVm vm)
{
    private const int Connections = 4;
    private const int WarmUpDevices = 4;
    private const long Size = 64 * MiB;
    private const int PartLength = (int)(2 * MiB);

    [Fact]
    public async Task Four_connections_share_a_device_only_when_the_export_allows_multi_conn()
    {
        using var directory = new TempDirectory();
        var memory = new MemoryBlockDevice(Size);
        var single = directory.CreateSparseFile("single.img", Size);
        var parts = Enumerable.Range(0, Connections).Select(i => Patterns.Generate(i * (long)PartLength, PartLength, seed: 10 + i)).ToArray();
        var files = parts.Select((bytes, i) => (Name: $"part{i}.bin", bytes)).ToDictionary(p => p.Name, p => p.bytes);
        files["parallel.sh"] = """
            # One O_DIRECT writer per CPU, each on its own 2 MiB (32 blocks of 64 KiB).
            pids=""
            for i in 0 1 2 3; do
              taskset -c $i /usr/bin/dd if=/scenario/part$i.bin of=/dev/nbd0 bs=64k seek=$((i * 32)) oflag=direct status=none &
              pids="$pids $!"
            done
            status=0
            for pid in $pids; do wait $pid || status=1; done
            exit $status
            """u8.ToArray();

        VmReport report;
        IReadOnlyList<long> received = [];
        IReadOnlyCollection<string> logs;
        using var barrier = new HostBarrier();
        await using (var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "mem" }, memory));
            catalog.Add(new Export(new ExportOptions { Name = "single", MultiConn = false }, FileBlockDevice.Open(single, readOnly: false)));
            catalog.Add(new Export(new ExportOptions { Name = "warm" }, new MemoryBlockDevice(MiB)));
        }))
        {
            // Linux 6.1 runs each connection's receive loop (recv_work) on nbd's WQ_MEM_RECLAIM workqueue. In a slow,
            // emulated guest the four loops queued at connect can outrun kworker creation; the workqueue then hands
            // them to its rescuer thread, which runs one at a time, and the replies on the other connections stay
            // unread until the kernel times the requests out (30 s). nbdkit gets the same. Attaching and detaching
            // four one-connection devices first leaves enough idle workers in the shared pool.
            var warmDevices = string.Join(' ', Enumerable.Range(16 - WarmUpDevices, WarmUpDevices)); // nbd12..nbd15
            var run = vm.RunAsync($$"""
                step warm_workers sh -c 'for i in {{warmDevices}}; do nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd$i -N warm || exit 1; done; for i in {{warmDevices}}; do nbd-client -d /dev/nbd$i || exit 1; done'
                step connect nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd0 -N mem -C {{Connections}}
                report queues "$(ls /sys/block/nbd0/mq | wc -l)"
                step parallel sh /scenario/parallel.sh
                host_barrier {{barrier.Port}}
                for i in 0 1 2 3; do
                  report_sha "sha$i" /dev/nbd0 bs=64k skip=$((i * 32)) count=32 iflag=direct
                done
                step disconnect nbd-client -d /dev/nbd0
                step single_multi nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd1 -N single -C {{Connections}}
                step single_one nbd-client {{KernelVm.HostAddress}} {{server.Port}} /dev/nbd1 -N single
                step single_disconnect nbd-client -d /dev/nbd1
                """,
                files,
                cpus: Connections);

            // While the guest waits at the barrier, count what each of the server's TCP connections has received.
            await barrier.InspectAsync(run, async () => received = await HostBarrier.BytesReceivedByServerAsync(server.Port));
            report = await run;
            logs = await server.WaitForDisconnectsAsync(expected: WarmUpDevices + Connections + 1);

            report.AssertCompleted();
            report.AssertSucceeded("warm_workers", "connect", "parallel", "disconnect", "single_one", "single_disconnect");
            for (var i = 0; i < Connections; i++)
            {
                var onServer = new byte[PartLength];
                await memory.ReadAsync(i * (long)PartLength, onServer, CancellationToken.None);
                Assert.Equal(parts[i], onServer);
            }
        }

        Assert.Equal(Connections, report.ResultInt64("queues"));
        for (var i = 0; i < Connections; i++)
        {
            Assert.Equal(Sha256(parts[i]), report.Result($"sha{i}"));
        }

        // Each writer's 2 MiB went out on its CPU's hardware queue, that is on its own connection.
        TestContext.Current.TestOutputHelper?.WriteLine($"bytes received per server connection: {string.Join(", ", received)}");
        Assert.Equal(Connections, received.Count);
        Assert.All(received, bytes => Assert.True(bytes >= PartLength, $"a connection received only {bytes} bytes: {string.Join(", ", received)}"));

        // Four connections negotiated "mem", each told CAN_MULTI_CONN; "single" never offers it, and the kernel (or
        // nbd-client before it) refuses to spread that device over several connections.
        var memConnections = logs.Where(l => l.Contains("export mem ", StringComparison.Ordinal)).ToList();
        Assert.Equal(Connections, memConnections.Count);
        Assert.All(memConnections, l => Assert.Contains("CanMultiConn", l, StringComparison.Ordinal));
        Assert.All(logs.Where(l => l.Contains("export single ", StringComparison.Ordinal)), l => Assert.DoesNotContain("CanMultiConn", l, StringComparison.Ordinal));
        Assert.NotEqual(0, report.StepExitCode("single_multi"));
    }
}
