using System.Diagnostics;
using Spindle.Client;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>
/// SIGHUP and spindle ctl reload: added exports appear, removed ones drain, changed ones apply to new connections,
/// a bad file is refused with its file and line and the running configuration kept, and a client working on an
/// unchanged export never notices.
/// </summary>
public sealed class ReloadTests
{
    private const long DiskSize = 64L << 20;

    [Fact]
    public async Task A_verified_write_workload_on_an_unchanged_export_never_notices_ten_reloads()
    {
        const string disk = "[disk]\n    exportname = $DIR/disk.img\n    filesize = 64M\n";
        await using var server = await OpsServer.StartAsync(disk + "[other0]\n    backend = memory\n    size = 1M\n");
        var options = new NbdClientOptions { Connections = 2 };
        await using var client = await NbdClient.ConnectAsync(server.Uri("disk"), options, TestContext.Current.CancellationToken);

        // The workload: 64 KiB writes of a pattern that names the block and the round, each read back and compared,
        // plus flushes, from 4 tasks at once, until the ten reloads are done.
        using var stop = new CancellationTokenSource();
        var blocks = (int)(DiskSize / 65536);
        var written = new int[blocks];
        long operations = 0, verified = 0, bytes = 0;
        var clock = Stopwatch.StartNew();
        var workers = Enumerable.Range(0, 4).Select(worker => Task.Run(async () =>
        {
            var random = new Random(worker);
            var buffer = new byte[65536];
            var back = new byte[65536];
            for (var round = 1; !stop.IsCancellationRequested; round++)
            {
                var block = (random.Next(blocks / 4) * 4) + worker;
                Fill(buffer, block, round);
                await client.WriteAsync(block * 65536L, buffer);
                await client.ReadAsync(block * 65536L, back);
                Assert.True(buffer.AsSpan().SequenceEqual(back), $"block {block} round {round} read back differently");
                written[block] = round;
                if (round % 16 == 0)
                {
                    await client.FlushAsync();
                }

                Interlocked.Add(ref operations, 2);
                Interlocked.Increment(ref verified);
                Interlocked.Add(ref bytes, 2 * 65536);
            }
        })).ToArray();

        // Ten reloads, each changing the other exports (added, removed, changed) and never [disk].
        for (var reload = 1; reload <= 10; reload++)
        {
            await Task.Delay(300, TestContext.Current.CancellationToken);
            var others = string.Concat(Enumerable.Range(reload % 3, 2).Select(i => $"[other{i}]\n    backend = memory\n    size = {i + 1}M\n    description = reload {reload}\n"));
            await File.WriteAllTextAsync(server.ConfigFile, OpsServer.Config(server.Port, disk.Replace("$DIR", server.Directory.Path, StringComparison.Ordinal) + others), TestContext.Current.CancellationToken);
            if (reload % 2 == 0)
            {
                var result = await server.CtlAsync("reload");
                Assert.True(result.ExitCode == 0, result.ToString());
            }
            else
            {
                server.Signal(1);
            }

            await server.WaitForLogAsync("Reload (", TimeSpan.FromSeconds(30), occurrence: reload);
        }

        await Task.Delay(300, TestContext.Current.CancellationToken);
        await stop.CancelAsync();
        await Task.WhenAll(workers);
        clock.Stop();

        // Every reload applied; none touched [disk]; the client never lost a connection nor sent a request twice.
        Assert.Equal(10, server.Count("Reload (") - server.Count("refused"));
        Assert.DoesNotContain(server.Output, line => line.Contains("Export 'disk'", StringComparison.Ordinal));
        Assert.Equal(0, client.Reconnections);
        Assert.Equal(0, client.ResentRequests);
        Assert.True(verified > 100, $"only {verified} verified writes");

        // What reached the file is what the client wrote last, block by block.
        await client.FlushAsync(TestContext.Current.CancellationToken);
        var image = await File.ReadAllBytesAsync(server.Directory.File("disk.img"), TestContext.Current.CancellationToken);
        var expected = new byte[65536];
        for (var block = 0; block < blocks; block++)
        {
            if (written[block] != 0)
            {
                Fill(expected, block, written[block]);
                Assert.True(image.AsSpan(block * 65536, 65536).SequenceEqual(expected), $"block {block} on disk is not round {written[block]}");
            }
        }

        var report = $"reload workload: 10 reloads (5 SIGHUP, 5 spindle ctl reload) in {clock.Elapsed.TotalSeconds:0.0} s; {verified} verified 64 KiB writes, " +
            $"{operations} requests, {bytes / (1 << 20)} MiB moved, {written.Count(r => r != 0)} blocks checked on disk; 0 errors, {client.Reconnections} reconnections, {client.ResentRequests} resent requests";
        TestContext.Current.TestOutputHelper?.WriteLine(report);
        Console.WriteLine(report);
    }

    [Fact]
    public async Task Reload_adds_drains_and_changes_exports_and_refuses_a_bad_file_with_its_line()
    {
        await using var server = await OpsServer.StartAsync("[keep]\n    backend = memory\n    size = 1M\n[gone]\n    backend = memory\n    size = 1M\n[changes]\n    exportname = $DIR/c.img\n    filesize = 1M\n");
        await using var before = await NbdClient.ConnectAsync(server.Uri("changes"), cancellationToken: TestContext.Current.CancellationToken);
        Assert.False(before.Export.IsReadOnly);

        // A file with an error: refused, with the file and line; the running exports stay.
        await File.WriteAllTextAsync(server.ConfigFile, OpsServer.Config(server.Port, "[keep]\n    backend = memory\n    size = 1M\n    nonsense = 1\n"), TestContext.Current.CancellationToken);
        server.Signal(1);
        var refused = await server.WaitForLogAsync("refused, the running configuration is kept", TimeSpan.FromSeconds(30));
        Assert.Contains($"{server.ConfigFile}:8: unknown export key 'nonsense'", refused, StringComparison.Ordinal);
        Assert.Equal(0, (await PeerTool.RunAsync("nbdinfo", ["--size", server.Uri("gone")])).ExitCode);

        await File.WriteAllTextAsync(server.ConfigFile, OpsServer.Config(server.Port,
            $"[keep]\n    backend = memory\n    size = 1M\n[changes]\n    exportname = {server.Directory.File("c.img")}\n    readonly = true\n[new]\n    backend = memory\n    size = 2M\n"), TestContext.Current.CancellationToken);
        var reload = await server.CtlAsync("reload");
        Assert.True(reload.ExitCode == 0, reload.ToString());
        Assert.Contains("1 added, 1 removed, 1 changed, 1 unchanged", reload.StandardOutput, StringComparison.Ordinal);

        Assert.Equal("2097152", (await PeerTool.RunCheckedAsync("nbdinfo", ["--size", server.Uri("new")])).StandardOutput.Trim());
        Assert.NotEqual(0, (await PeerTool.RunAsync("nbdinfo", ["--size", server.Uri("gone")])).ExitCode);

        // The change applies to new connections; the one made before keeps what it negotiated (and its data path).
        Assert.Equal(0, (await PeerTool.RunAsync(SpindleExecutable.Path, ["info", "--is", "read-only", server.Uri("changes")])).ExitCode);
        await before.WriteAsync(0, new byte[4096], TestContext.Current.CancellationToken);
        await before.FlushAsync(TestContext.Current.CancellationToken);
    }

    [Fact]
    public async Task A_removed_export_drains_and_spindles_client_carries_on_through_another_server()
    {
        using var shared = new TempDirectory();
        var image = shared.CreateSparseFile("disk.img", 16 << 20);
        var section = $"[disk]\n    exportname = {image}\n";
        await using var first = await OpsServer.StartAsync(section, extra: "-v");
        await using var second = await OpsServer.StartAsync(section);
        using var log = new CapturingLoggerProvider();
        var options = new NbdClientOptions { DeadConnectionTimeout = TimeSpan.FromSeconds(60), LoggerFactory = log };
        var uri = NbdUri.Parse(first.Uri("disk"));
        await using var client = await NbdClient.ConnectAsync([uri, NbdUri.Parse(second.Uri("disk"))], options, TestContext.Current.CancellationToken);

        using var stop = new CancellationTokenSource();
        long writes = 0;
        var writer = Task.Run(async () =>
        {
            var buffer = new byte[4096];
            for (var i = 0; !stop.IsCancellationRequested; i++)
            {
                Array.Fill(buffer, (byte)(i % 251));
                await client.WriteAsync((i % 4096) * 4096L, buffer);
                Interlocked.Increment(ref writes);
            }
        });

        await SystemdTests.WaitForAsync(() => Interlocked.Read(ref writes) > 200, "writes before the removal");
        var removed = await first.CtlAsync("remove", "disk");
        Assert.True(removed.ExitCode == 0, removed.ToString());
        var atRemoval = Interlocked.Read(ref writes);
        await SystemdTests.WaitForAsync(() => Interlocked.Read(ref writes) > atRemoval + 200,
            $"writes after the removal ({Interlocked.Read(ref writes) - atRemoval}; paths {string.Join(", ", client.PathStatus.Select(p => $"{p.Connections} {p.LastError}"))})\n{string.Join('\n', first.Output.Where(l => !l.Contains("WRITE", StringComparison.Ordinal)).TakeLast(25))}\nclient:\n{string.Join('\n', log.Lines)}");
        await stop.CancelAsync();
        await writer;

        // The first server drained the connection (ESHUTDOWN), the client went on through the second.
        await first.WaitForLogAsync("drained", TimeSpan.FromSeconds(30));
        Assert.True(client.PathStatus[1].Connections > 0);
        Assert.Equal(0, client.PathStatus[0].Connections);
    }

    private static void Fill(byte[] buffer, int block, int round)
    {
        for (var i = 0; i < buffer.Length; i += 8)
        {
            BitConverter.TryWriteBytes(buffer.AsSpan(i), ((long)block << 32) | (uint)(round * 8191 + i));
        }
    }
}
