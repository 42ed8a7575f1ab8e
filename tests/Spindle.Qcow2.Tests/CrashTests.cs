using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>
/// A child process writes through the backend and is killed with SIGKILL at random moments; after each kill qemu-img
/// check must find no corruption (leaks are allowed, and repaired) and every write the child reported durable must
/// read back, through qemu.
/// </summary>
public sealed class CrashTests(ITestOutputHelper output)
{
    private const int Slots = 256;
    private const int SlotSize = 64 * 1024;

    [Theory]
    [InlineData("compat=1.1,cluster_size=4096", "", 8)]
    [InlineData("compat=1.1,cluster_size=512,refcount_bits=64", "", 6)]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on", "backing", 5)]
    [InlineData("compat=1.1,cluster_size=16384", "snapshot", 6)]
    [InlineData("compat=0.10,cluster_size=65536", "", 5)]
    public async Task Killed_writer_leaves_a_consistent_image_holding_every_acknowledged_write(string options, string setup, int kills)
    {
        using var directory = new TempDirectory();
        var size = (long)Slots * SlotSize;
        if (setup == "backing")
        {
            // Writes copy on write from a backing file that has data everywhere.
            var backing = await Qemu.Create(directory, "backing.qcow2", "compat=1.1", size);
            await Qemu.Io(backing, "qcow2", $"write -P 0x5a 0 {size}");
            options += ",backing_file=backing.qcow2,backing_fmt=qcow2";
        }

        var image = await Qemu.Create(directory, "crash.qcow2", options, size);
        if (setup == "snapshot")
        {
            // Every first write to a cluster copies it away from the snapshot (shared clusters, shared L2 tables).
            await Qemu.Io(image, "qcow2", $"write -P 0x5a 0 {size}");
            await Qemu.Img("snapshot", "-c", "kept", image);
        }

        var random = new Random(kills * 31 + options.Length);
        var verified = 0;
        var leaks = 0;
        for (var kill = 0; kill < kills; kill++)
        {
            var lines = new ConcurrentQueue<string>();
            var process = PeerTool.Start(DotnetHost(), [WriterPath(), image, kill.ToString(CultureInfo.InvariantCulture), Slots.ToString(CultureInfo.InvariantCulture), SlotSize.ToString(CultureInfo.InvariantCulture)], onOutput: lines.Enqueue);
            try
            {
                var opened = Stopwatch.StartNew();
                while (!lines.Contains("OPEN") && !process.HasExited && opened.Elapsed < TimeSpan.FromSeconds(60))
                {
                    await Task.Delay(5);
                }

                Assert.True(lines.Contains("OPEN"), $"the writer did not start: {string.Join('\n', lines)}");

                // Kill after a random number of acknowledgements (or at once), so the kill lands mid-run.
                var target = random.Next(0, Slots * 3 / 4);
                while (lines.Count(l => l.StartsWith("ACK", StringComparison.Ordinal)) < target && !process.HasExited && opened.Elapsed < TimeSpan.FromSeconds(60))
                {
                    await Task.Delay(1);
                }
            }
            finally
            {
                process.Kill(); // SIGKILL: no finally blocks, no flush, no close
                await process.WaitForExitAsync();
                process.Dispose();
            }

            var check = await Qemu.Check(image);
            Assert.True(check.Corruptions == 0 && check.Errors == 0, $"kill {kill}: {check.Output}");
            leaks += check.Leaks;
            if (check.Leaks > 0)
            {
                await Qemu.Check(image, repairLeaks: true);
            }

            var raw = directory.File("crash.raw");
            await Qemu.Img("convert", "-q", "-f", "qcow2", "-O", "raw", image, raw);
            var content = await File.ReadAllBytesAsync(raw);
            // A line cut short by the kill has no END: that report never completed, so it proves nothing.
            foreach (var line in lines.Where(l => l.StartsWith("ACK ", StringComparison.Ordinal) && l.EndsWith(" END", StringComparison.Ordinal)))
            {
                var parts = line.Split(' ');
                var offset = long.Parse(parts[2], CultureInfo.InvariantCulture);
                var length = int.Parse(parts[3], CultureInfo.InvariantCulture);
                var value = byte.Parse(parts[4], CultureInfo.InvariantCulture);
                var span = content.AsSpan((int)offset, length);
                var bad = span.IndexOfAnyExcept(value);
                if (bad >= 0)
                {
                    Assert.Fail($"kill {kill}: acknowledged '{line}' reads {span[bad]} at +{bad}");
                }

                verified++;
            }
        }

        await Qemu.AssertConsistent(image, allowLeaks: false);
        if (setup == "snapshot")
        {
            await Qemu.Img("convert", "-q", "-f", "qcow2", "-l", "snapshot.name=kept", "-O", "raw", image, directory.File("kept.raw"));
            Assert.Equal(-1, (await File.ReadAllBytesAsync(directory.File("kept.raw"))).AsSpan().IndexOfAnyExcept((byte)0x5a));
        }

        output.WriteLine($"{options} {setup}: {kills} kills, {verified} acknowledged writes verified, {leaks} leaked clusters repaired, no corruption");
        Assert.True(verified > 0, "no write was acknowledged before the kills");
    }

    internal static string WriterPath() => Path.Combine(AppContext.BaseDirectory, "Spindle.Qcow2.CrashWriter.dll");

    internal static string DotnetHost()
    {
        // The runtime directory is <dotnet root>/shared/Microsoft.NETCore.App/<version>/.
        var root = Path.GetFullPath(Path.Combine(System.Runtime.InteropServices.RuntimeEnvironment.GetRuntimeDirectory(), "..", "..", ".."));
        return Path.Combine(root, "dotnet");
    }
}
