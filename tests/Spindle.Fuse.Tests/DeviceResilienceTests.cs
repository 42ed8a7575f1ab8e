using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using Spindle.Fuse.Devices;
using Spindle.Fuse.Tests.Support;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>
/// A remote disk that survives its server, end to end with real processes: <c>spindle serve</c> on 127.0.0.1,
/// <c>spindle attach nbd://...</c> (FUSE file, loop device), ext4 on top, and a workload writing files and fsync'ing
/// each while the server is killed and restarted, while its connections are cut, while one of two paths dies. The
/// workload must see no error; afterwards fsck is clean and every file's SHA-256 is checked in the image file itself,
/// read without Spindle, so the bytes are proven to be on the server's side. And when the server never comes back,
/// I/O fails within the dead-connection timeout instead of hanging.
/// </summary>
public sealed class DeviceResilienceTests
{
    private const long ImageSize = 256L << 20;
    private const int Disruptions = 5;

    /// <summary>The bound on any one wait for the workload (a restart included); a failure, never a figure.</summary>
    private static readonly TimeSpan ProgressBound = TimeSpan.FromSeconds(45);

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Writes_and_fsyncs_see_no_error_while_the_server_is_killed_and_restarted()
    {
        using var scratch = new TempDirectory();
        var image = scratch.CreateSparseFile("disk.img", ImageSize);
        var suffix = Guid.NewGuid().ToString("N")[..8];
        var (uuid, label, serial) = (Guid.NewGuid().ToString(), "e2e-" + suffix, "SN" + suffix);
        await using var server = await ServeProcess.StartAsync(ServeProcess.FreePort(), image, "--uuid", uuid, "--label", label, "--serial", serial);
        await using var attachment = new Attachment(scratch.File("run"), NewName());
        var filesystem = Directory.CreateDirectory(scratch.File("fs")).FullName;
        FileWriter? writer = null;
        var watch = Stopwatch.StartNew();
        try
        {
            var loop = await attachment.AttachAsync(server.Uri, "--dead-timeout", "never");

            // The export's stable names lead to the loop device while it is attached.
            Assert.Equal(loop, attachment.LinkTarget("by-uuid", uuid));
            Assert.Equal(loop, attachment.LinkTarget("by-label", label));
            Assert.Equal(loop, attachment.LinkTarget("by-serial", serial));

            await MakeFileSystemAsync(loop, filesystem);
            writer = FileWriter.Start(Path.Combine(filesystem, "data"), Seed());
            var downtimes = new List<double>();
            for (var kill = 0; kill < Disruptions; kill++)
            {
                await writer.WaitForProgressAsync(minFiles: 4, minTime: TimeSpan.FromSeconds(1), enoughFiles: 40, ProgressBound);
                await server.KillAsync();
                var down = Stopwatch.StartNew();
                await Task.Delay(Random.Shared.Next(200, 1000), Token);
                await server.RestartAsync();
                downtimes.Add(down.Elapsed.TotalSeconds);
            }

            await writer.WaitForProgressAsync(minFiles: 4, minTime: TimeSpan.FromSeconds(1), enoughFiles: 40, ProgressBound);
            await writer.StopAsync(ProgressBound);
            Assert.True(writer.Error is null, $"the workload failed: {writer.Error}\n{attachment.Log}");

            // Every kill cost the client its connection, and it got one back each time.
            var reconnections = attachment.Reconnections;
            var losses = attachment.Losses();
            Assert.True(reconnections >= Disruptions, $"{reconnections} reconnections for {Disruptions} kills:\n{attachment.Log}");

            await UnmountCheckAndDetachAsync(attachment, loop, filesystem);
            Assert.Null(attachment.LinkTarget("by-uuid", uuid));
            Assert.Null(attachment.LinkTarget("by-label", label));
            Assert.Null(attachment.LinkTarget("by-serial", serial));
            Assert.Equal(0, await server.StopAsync());

            var verified = await VerifyInImageAsync(image, writer.Files, scratch);
            E2eReport.Record(nameof(Writes_and_fsyncs_see_no_error_while_the_server_is_killed_and_restarted), Figures(writer, verified, watch,
                ("serverKills", Disruptions),
                ("serverRestarts", server.Restarts),
                ("secondsServerDown", downtimes.ToArray()),
                ("clientReconnections", reconnections),
                ("requestsInFlightAtEachLoss", losses.Select(loss => loss.InFlight).ToArray())));
        }
        finally
        {
            await CleanUpAsync(writer, filesystem, server);
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public async Task Writes_and_fsyncs_see_no_error_while_the_server_cuts_every_connection(int connections)
    {
        using var scratch = new TempDirectory();
        var image = scratch.CreateSparseFile("disk.img", ImageSize);
        await using var server = await ServeProcess.StartAsync(ServeProcess.FreePort(), image);
        await using var attachment = new Attachment(scratch.File("run"), NewName());
        var filesystem = Directory.CreateDirectory(scratch.File("fs")).FullName;
        FileWriter? writer = null;
        var watch = Stopwatch.StartNew();
        try
        {
            var loop = await attachment.AttachAsync(server.Uri, "--dead-timeout", "never", "-C", connections.ToString(CultureInfo.InvariantCulture));
            await MakeFileSystemAsync(loop, filesystem);
            writer = FileWriter.Start(Path.Combine(filesystem, "data"), Seed());
            for (var cut = 0; cut < Disruptions; cut++)
            {
                // Files fsync'd since the last cut went through new connections, and every one is back: all are cut.
                await writer.WaitForProgressAsync(minFiles: 4, minTime: TimeSpan.FromSeconds(1), enoughFiles: 40, ProgressBound);
                await WaitUntilAsync(() => attachment.Reconnections >= connections * cut, $"{connections * cut} reconnections", attachment: attachment);
                server.CutConnections();
                await WaitUntilAsync(() => server.ReportedCuts().Count > cut, $"the server to report cut {cut + 1}", server);
            }

            await writer.WaitForProgressAsync(minFiles: 4, minTime: TimeSpan.FromSeconds(1), enoughFiles: 40, ProgressBound);
            await writer.StopAsync(ProgressBound);
            Assert.True(writer.Error is null, $"the workload failed: {writer.Error}\n{attachment.Log}");

            // Every cut closed all the client's connections, and each came back.
            var cuts = server.ReportedCuts();
            Assert.Equal(Enumerable.Repeat(connections, Disruptions), cuts);
            var reconnections = attachment.Reconnections;
            var losses = attachment.Losses();
            Assert.True(reconnections >= connections * Disruptions, $"{reconnections} reconnections for {Disruptions} cuts of {connections}:\n{attachment.Log}");

            await UnmountCheckAndDetachAsync(attachment, loop, filesystem);
            Assert.Equal(0, await server.StopAsync());
            var verified = await VerifyInImageAsync(image, writer.Files, scratch);
            E2eReport.Record(nameof(Writes_and_fsyncs_see_no_error_while_the_server_cuts_every_connection), Figures(writer, verified, watch,
                ("connectionsPerServer", connections),
                ("connectionCuts", cuts.Count),
                ("connectionsClosedByEachCut", cuts.ToArray()),
                ("clientReconnections", reconnections),
                ("requestsInFlightAtEachLoss", losses.Select(loss => loss.InFlight).ToArray())));
        }
        finally
        {
            await CleanUpAsync(writer, filesystem, server);
        }
    }

    [Fact]
    public async Task With_two_paths_writes_go_on_over_the_survivor_when_one_server_is_killed()
    {
        using var scratch = new TempDirectory();
        var image = scratch.CreateSparseFile("disk.img", ImageSize);
        var uuid = Guid.NewGuid().ToString();
        await using var first = await ServeProcess.StartAsync(ServeProcess.FreePort(), image, "--uuid", uuid);
        await using var second = await ServeProcess.StartAsync(ServeProcess.FreePort(), image, "--uuid", uuid);
        await using var attachment = new Attachment(scratch.File("run"), NewName());
        var filesystem = Directory.CreateDirectory(scratch.File("fs")).FullName;
        FileWriter? writer = null;
        var watch = Stopwatch.StartNew();
        try
        {
            // A generous dead timeout: if failover did not work the workload fails with EIO instead of hanging.
            var loop = await attachment.AttachAsync(first.Uri, "--path", second.Uri, "--dead-timeout", "30");
            await WaitUntilAsync(() => attachment.Log.Contains($"127.0.0.1:{first.Port}: export", StringComparison.Ordinal) &&
                attachment.Log.Contains($"127.0.0.1:{second.Port}: export", StringComparison.Ordinal), "both paths to connect", attachment: attachment);
            Assert.Equal(loop, attachment.LinkTarget("by-uuid", uuid));

            await MakeFileSystemAsync(loop, filesystem);
            writer = FileWriter.Start(Path.Combine(filesystem, "data"), Seed());
            await writer.WaitForProgressAsync(minFiles: 8, minTime: TimeSpan.FromSeconds(2), enoughFiles: 60, ProgressBound);
            var trafficBeforeKill = new[] { await ServerTrafficAsync(first.Port), await ServerTrafficAsync(second.Port) };

            // Frozen first, so that the kill certainly finds requests in flight on its path: they must be sent again
            // over the other path, and the workload must not notice beyond a stall.
            first.Freeze();
            await Task.Delay(TimeSpan.FromSeconds(1), Token);
            var filesBeforeKill = writer.Completed;
            await first.KillAsync();
            await writer.WaitForProgressAsync(minFiles: 8, minTime: TimeSpan.FromSeconds(3), enoughFiles: 80, ProgressBound);
            await writer.StopAsync(ProgressBound);
            Assert.True(writer.Error is null, $"the workload failed: {writer.Error}\n{attachment.Log}");
            Assert.False(first.IsRunning, "the first server should have stayed dead");
            var filesAfterKill = writer.Completed - filesBeforeKill;
            var inFlightOnKilledPath = attachment.Losses().Where(loss => loss.Server == $"127.0.0.1:{first.Port}").Sum(loss => loss.InFlight);
            Assert.True(inFlightOnKilledPath >= 1, $"the killed path had no requests in flight to move:\n{attachment.Log}");

            await UnmountCheckAndDetachAsync(attachment, loop, filesystem);
            Assert.Null(attachment.LinkTarget("by-uuid", uuid));
            Assert.Equal(0, await second.StopAsync());
            var verified = await VerifyInImageAsync(image, writer.Files, scratch);
            E2eReport.Record(nameof(With_two_paths_writes_go_on_over_the_survivor_when_one_server_is_killed), Figures(writer, verified, watch,
                ("paths", 2),
                ("serversKilled", 1),
                ("filesBeforeKill", filesBeforeKill),
                ("filesAfterKill", filesAfterKill),
                ("requestsInFlightOnKilledPath", inFlightOnKilledPath),
                ("mibReceivedByEachServerBeforeKill", trafficBeforeKill.Select(traffic => Math.Round(traffic.Received / 1048576.0, 1)).ToArray()),
                ("mibSentByEachServerBeforeKill", trafficBeforeKill.Select(traffic => Math.Round(traffic.Sent / 1048576.0, 1)).ToArray())));
        }
        finally
        {
            await CleanUpAsync(writer, filesystem, first, second);
        }
    }

    [Fact]
    public async Task After_the_dead_timeout_reads_fail_with_EIO_instead_of_hanging_and_detach_still_works()
    {
        const int DeadTimeoutSeconds = 3;
        using var scratch = new TempDirectory();
        var image = scratch.CreateSparseFile("disk.img", ImageSize);
        using (var stream = new FileStream(image, FileMode.Open, FileAccess.Write))
        {
            stream.Write(Patterns.Random(1 << 20, seed: 61));
        }

        await using var server = await ServeProcess.StartAsync(ServeProcess.FreePort(), image);
        await using var attachment = new Attachment(scratch.File("run"), NewName());
        var watch = Stopwatch.StartNew();
        var loop = await attachment.AttachAsync(server.Uri, "--dead-timeout", DeadTimeoutSeconds.ToString(CultureInfo.InvariantCulture));

        // Alive: a direct read of the loop device returns the image's bytes.
        var (result, data, _) = await ReadDirectAsync(loop, 8192);
        Assert.Equal(4096, result);
        Assert.Equal(Patterns.Random(1 << 20, seed: 61).AsSpan(8192, 4096).ToArray(), data);

        await server.KillAsync();
        var (loopResult, _, loopSeconds) = await ReadDirectAsync(loop, 65536);
        Assert.True(loopResult == -Posix.EIO, $"a read of {loop} after the server died returned {Describe(loopResult)}, not EIO\n{attachment.Log}");

        // The FUSE file under the loop device says the same, at once now that the client has given up.
        var (fileResult, _, fileSeconds) = await ReadDirectAsync(attachment.File, 131072);
        Assert.True(fileResult == -Posix.EIO, $"a read of {attachment.File} returned {Describe(fileResult)}, not EIO\n{attachment.Log}");
        Assert.Contains("(the dead-connection timeout)", attachment.Log, StringComparison.Ordinal);

        var pid = attachment.Pid;
        var detachWatch = Stopwatch.StartNew();
        var detach = await attachment.DetachAsync();
        var detachSeconds = detachWatch.Elapsed.TotalSeconds;
        Assert.True(detach.ExitCode == 0, $"detach after the server died: {detach}");
        Assert.False(File.Exists(attachment.StatePath), "the state file is left");
        Assert.False(Directory.Exists(attachment.MountPoint), "the mount directory is left");
        Assert.False(DaemonProcess.IsAlive(pid), "the mount server still runs");
        Assert.NotEqual(attachment.File, LoopDevice.Query(loop)?.BackingFile);

        E2eReport.Record(nameof(After_the_dead_timeout_reads_fail_with_EIO_instead_of_hanging_and_detach_still_works), new Dictionary<string, object?>
        {
            ["deadTimeoutSeconds"] = DeadTimeoutSeconds,
            ["secondsFromKillToEioOnLoopDevice"] = loopSeconds,
            ["secondsToEioOnFuseFileAfterThat"] = fileSeconds,
            ["detachSeconds"] = detachSeconds,
            ["seconds"] = watch.Elapsed.TotalSeconds,
        });
    }

    private static string NewName() => "e2e-" + Guid.NewGuid().ToString("N")[..10];

    private static int Seed()
    {
        var seed = Random.Shared.Next();
        TestContext.Current.TestOutputHelper?.WriteLine($"workload seed {seed}");
        return seed;
    }

    private static async Task MakeFileSystemAsync(string loop, string filesystem)
    {
        await PeerTool.RunCheckedAsync("mkfs.ext4", ["-q", "-F", loop], TimeSpan.FromSeconds(120));
        await PeerTool.RunCheckedAsync("mount", [loop, filesystem]);
    }

    /// <summary>Unmounts, checks the file system through the device (fsck -n -f), detaches and checks nothing is left.</summary>
    private static async Task UnmountCheckAndDetachAsync(Attachment attachment, string loop, string filesystem)
    {
        await PeerTool.RunCheckedAsync("umount", [filesystem]);
        await PeerTool.RunCheckedAsync("fsck.ext4", ["-n", "-f", loop], TimeSpan.FromSeconds(120));
        var pid = attachment.Pid;
        var detach = await attachment.DetachAsync();
        Assert.True(detach.ExitCode == 0, $"spindle detach failed: {detach}");
        Assert.False(File.Exists(attachment.StatePath), "the state file is left");
        Assert.False(Directory.Exists(attachment.MountPoint), "the mount directory is left");
        Assert.False(DaemonProcess.IsAlive(pid), "the mount server still runs");
        Assert.NotEqual(attachment.File, LoopDevice.Query(loop)?.BackingFile);
    }

    /// <summary>
    /// Checks the image file itself, without Spindle: fsck, then every file the workload wrote dumped with debugfs
    /// and its SHA-256 compared, and no file more or less. Returns the files and bytes verified.
    /// </summary>
    private static async Task<(int Files, long Bytes)> VerifyInImageAsync(string image, IReadOnlyList<WrittenFile> written, TempDirectory scratch)
    {
        await PeerTool.RunCheckedAsync("fsck.ext4", ["-n", "-f", image], TimeSpan.FromSeconds(120));
        var dump = Directory.CreateDirectory(scratch.File("from-image")).FullName;
        await PeerTool.RunCheckedAsync("debugfs", ["-R", $"rdump /data {dump}", image], TimeSpan.FromSeconds(120));
        var directory = Path.Combine(dump, "data");
        var found = Directory.Exists(directory) ? Directory.GetFiles(directory).Select(path => Path.GetFileName(path)).Order(StringComparer.Ordinal).ToList() : [];
        Assert.Equal(written.Select(file => file.Name).Order(StringComparer.Ordinal).ToList(), found);
        long bytes = 0;
        foreach (var file in written)
        {
            var contents = await File.ReadAllBytesAsync(Path.Combine(directory, file.Name), Token);
            Assert.True(file.Sha256 == Convert.ToHexString(SHA256.HashData(contents)), $"{file.Name} ({file.Size} bytes) differs in the image");
            bytes += contents.Length;
        }

        return (written.Count, bytes);
    }

    private static List<KeyValuePair<string, object?>> Figures(FileWriter writer, (int Files, long Bytes) verified, Stopwatch watch, params (string Key, object? Value)[] specific)
    {
        List<KeyValuePair<string, object?>> figures = [.. specific.Select(pair => KeyValuePair.Create(pair.Key, pair.Value))];
        figures.AddRange(new Dictionary<string, object?>
        {
            ["filesWritten"] = writer.Files.Count,
            ["bytesWritten"] = writer.Bytes,
            ["filesVerifiedInImage"] = verified.Files,
            ["bytesVerifiedInImage"] = verified.Bytes,
            ["workloadErrors"] = writer.Error is null ? 0 : 1,
            ["longestWriteFsyncSeconds"] = writer.LongestStall.TotalSeconds,
            ["medianWriteFsyncSeconds"] = writer.Median.TotalSeconds,
            ["seconds"] = watch.Elapsed.TotalSeconds,
            ["seed"] = writer.Seed,
        });
        return figures;
    }

    /// <summary>
    /// After a failure: stop the workload, bring a server that was left down back (a hard mount flushes only to a
    /// live server), unmount the file system. The attachment and the servers are disposed after this.
    /// </summary>
    private static async Task CleanUpAsync(FileWriter? writer, string filesystem, params ServeProcess[] servers)
    {
        writer?.Dispose();
        if (MountTable.Find(filesystem) is null)
        {
            return;
        }

        foreach (var server in servers)
        {
            await server.EnsureRunningAsync();
        }

        await PeerTool.RunAsync("umount", [filesystem], TimeSpan.FromSeconds(60));
        SpindleCli.EnsureUnmounted(filesystem);
    }

    /// <summary>
    /// pread of 4 KiB at <paramref name="offset"/> with O_DIRECT (an aligned buffer, so the loop device takes it), on
    /// a thread of its own: the result (bytes or -errno), the data, and how long it took. Fails the test if it has
    /// not returned within 30 s.
    /// </summary>
    private static async Task<(long Result, byte[] Data, double Seconds)> ReadDirectAsync(string path, long offset)
    {
        var read = Task.Factory.StartNew(() =>
        {
            var watch = Stopwatch.StartNew();
            var (result, data) = ReadDirect(path, offset);
            return (result, data, watch.Elapsed.TotalSeconds);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        try
        {
            return await read.WaitAsync(TimeSpan.FromSeconds(30), Token);
        }
        catch (TimeoutException)
        {
            Assert.Fail($"a direct read of {path} at {offset} did not return within 30 s: it hangs");
            throw;
        }
    }

    private static unsafe (long Result, byte[] Data) ReadDirect(string path, long offset)
    {
        var fd = Posix.Open(path, Posix.ORdOnly | Posix.ODirect);
        if (fd < 0)
        {
            return (fd, []);
        }

        var buffer = NativeMemory.AlignedAlloc(4096, 4096);
        try
        {
            var span = new Span<byte>(buffer, 4096);
            var result = Posix.PRead(fd, span, offset);
            return (result, result > 0 ? span[..(int)result].ToArray() : []);
        }
        finally
        {
            NativeMemory.AlignedFree(buffer);
            Posix.Close(fd);
        }
    }

    private static string Describe(long result) => result >= 0 ? $"{result} bytes" : Marshal.GetPInvokeErrorMessage((int)-result);

    /// <summary>
    /// The bytes the established connections of the server on <paramref name="port"/> have received and sent so far
    /// (tcp_info's bytes_received and bytes_sent, from ss): what each path of a multipath attachment carried.
    /// </summary>
    private static async Task<(long Received, long Sent)> ServerTrafficAsync(int port)
    {
        var result = await PeerTool.RunCheckedAsync("ss", ["-tinH", "state", "established", $"( sport = :{port} )"]);
        long received = 0, sent = 0;
        foreach (var field in result.StandardOutput.Split([' ', '\t', '\n'], StringSplitOptions.RemoveEmptyEntries))
        {
            if (field.StartsWith("bytes_received:", StringComparison.Ordinal))
            {
                received += long.Parse(field["bytes_received:".Length..], CultureInfo.InvariantCulture);
            }
            else if (field.StartsWith("bytes_sent:", StringComparison.Ordinal))
            {
                sent += long.Parse(field["bytes_sent:".Length..], CultureInfo.InvariantCulture);
            }
        }

        return (received, sent);
    }

    private static async Task WaitUntilAsync(Func<bool> condition, string what, ServeProcess? server = null, Attachment? attachment = null)
    {
        var watch = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(watch.Elapsed < TimeSpan.FromSeconds(30), $"waited 30 s for {what}\n{server?.Output}\n{attachment?.Log}");
            await Task.Delay(20, Token);
        }
    }
}
