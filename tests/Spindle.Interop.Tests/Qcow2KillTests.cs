using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Globalization;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>
/// The real <c>spindle serve</c> process killed with SIGKILL at random points while libnbd writes to a qcow2 image
/// with FUA and FLUSH (python/qcow2_writer.py), many times: after every kill qemu-img check finds no corruption
/// (leaks are allowed and repaired with -r leaks) and every acknowledged FUA or flushed write is read back by qemu.
/// </summary>
public sealed class Qcow2KillTests(ITestOutputHelper output)
{
    private const int Slots = 1024;
    private const int SlotSize = 64 * 1024;
    private const int SectorsPerSlot = SlotSize / 512;
    private const ulong Magic = 0x5350494E444C4531;

    /// <summary>Kills per image kind: 5 (20 in all) unless $SPINDLE_QCOW2_KILLS asks for more (a longer run by hand).</summary>
    private static readonly int KillsPerSetup = int.TryParse(Environment.GetEnvironmentVariable("SPINDLE_QCOW2_KILLS"), out var kills) && kills > 0 ? Math.Min(kills, 1000) : 5;

    /// <summary>Image kinds, each killed <see cref="KillsPerSetup"/> times.</summary>
    public static TheoryData<string, string, bool> Setups => new()
    {
        { "clusters-64k", "compat=1.1,cluster_size=65536", false },
        { "clusters-4k-refcount-64", "compat=1.1,cluster_size=4096,refcount_bits=64", false },
        { "subclusters-over-backing", "compat=1.1,cluster_size=65536,extended_l2=on", true },
        { "v2-with-snapshots", "compat=0.10,cluster_size=65536", false },
    };

    [Theory]
    [MemberData(nameof(Setups))]
    public async Task Killed_server_leaves_a_consistent_image_with_every_durable_write(string setup, string options, bool backing)
    {
        using var directory = new TempDirectory();
        var extra = new List<string>();
        if (backing)
        {
            await Qcow2Peers.Img("create", "-q", "-f", "raw", directory.File("base.raw"), (Slots * (long)SlotSize).ToString(CultureInfo.InvariantCulture));
            extra.AddRange(["-b", "base.raw", "-F", "raw"]);
        }

        var image = await Qcow2Peers.Create(directory, "disk.qcow2", options, Slots * (long)SlotSize, [.. extra]);
        var snapshots = setup.StartsWith("v2", StringComparison.Ordinal);

        // What each sector holds as far as the test knows: 0 zeroes, else the generation of the write it holds.
        var baseline = new long[Slots, SectorsPerSlot];
        var random = new Random(setup.GetHashCode(StringComparison.Ordinal) ^ Environment.TickCount);
        long generation = 0;
        int durableTotal = 0, sectorsChecked = 0, leaksRepaired = 0, unflushedSeen = 0;
        var snapshotDumps = new List<(string Name, string Dump)>();
        for (var kill = 0; kill < KillsPerSetup; kill++)
        {
            var lines = new ConcurrentQueue<string>();
            var target = random.Next(20, 400);
            await using (var spindle = await Qcow2Peers.Serve(image))
            {
                using var writer = PeerTool.Start(PeerTool.SystemPython,
                    [Script("qcow2_writer.py"), spindle.Uri!, Slots.ToString(CultureInfo.InvariantCulture), SlotSize.ToString(CultureInfo.InvariantCulture),
                     generation.ToString(CultureInfo.InvariantCulture), random.Next().ToString(CultureInfo.InvariantCulture), "60"],
                    onOutput: lines.Enqueue);
                var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
                while (lines.Count(l => l.StartsWith("D ", StringComparison.Ordinal)) < target && !writer.HasExited && DateTime.UtcNow < deadline)
                {
                    await Task.Delay(5, TestContext.Current.CancellationToken);
                }

                await Task.Delay(random.Next(0, 30), TestContext.Current.CancellationToken);
                PeerTool.Signal(spindle.Process, 9);
                using var wait = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                await spindle.Process.WaitForExitAsync(wait.Token);
                await writer.WaitForExitAsync(wait.Token);
                Assert.DoesNotContain(lines, l => l.StartsWith("E ", StringComparison.Ordinal));
            }

            // qemu-img check: no corruption, ever; leaks are what a crash may leave, and -r leaks repairs them.
            var check = await Qcow2Peers.Check(image);
            Assert.True(check.Corruptions == 0 && check.Errors == 0, $"kill {kill} of {setup}: {check.Output}");
            if (check.Leaks > 0)
            {
                leaksRepaired += check.Leaks;
                await Qcow2Peers.Check(image, repairLeaks: true);
                await Qcow2Peers.AssertClean(image, allowLeaks: false);
            }

            var dump = directory.File("dump.raw");
            await Qcow2Peers.Img("convert", "-f", "qcow2", "-O", "raw", image, dump);
            var data = await File.ReadAllBytesAsync(dump);
            var (durable, checkedSectors, newer) = Verify(lines.ToArray(), baseline, data, ref generation, $"kill {kill} of {setup}");
            durableTotal += durable;
            sectorsChecked += checkedSectors;
            unflushedSeen += newer;

            // Internal snapshots taken between runs make later writes copy shared clusters (and L2 tables).
            if (snapshots)
            {
                var name = "k" + kill.ToString(CultureInfo.InvariantCulture);
                await Qcow2Peers.Img("snapshot", "-c", name, image);
                var saved = directory.File(name + ".raw");
                File.Move(dump, saved);
                snapshotDumps.Add((name, saved));
            }
        }

        foreach (var (name, dump) in snapshotDumps)
        {
            var snapshot = directory.File("snapshot.raw");
            await Qcow2Peers.Img("convert", "-l", name, "-f", "qcow2", "-O", "raw", image, snapshot);
            Assert.True(await Qcow2Peers.Same(snapshot, "raw", dump, "raw"), $"snapshot {name} changed");
            File.Delete(snapshot);
        }

        await Qcow2Peers.AssertClean(image, allowLeaks: false);
        output.WriteLine($"qcow2 kill test {setup}: {KillsPerSetup} kills, {durableTotal} durable writes acknowledged, {sectorsChecked} sectors verified, " +
                         $"{unflushedSeen} sectors held newer unflushed writes, {leaksRepaired} leaked clusters repaired, 0 corruptions");
        Console.WriteLine($"QCOW2-KILL {setup} kills={KillsPerSetup} durable={durableTotal} sectors={sectorsChecked} newer={unflushedSeen} leaks={leaksRepaired} corruptions=0");
    }

    /// <summary>
    /// Checks every sector against what the writer issued and acknowledged: it must hold the last durable write that
    /// covered it or one issued after that (which may or may not have reached the disk), and never a torn or foreign
    /// sector. Updates <paramref name="baseline"/> to what was found. Returns the durable writes, sectors checked and
    /// sectors found holding a write newer than the last durable one.
    /// </summary>
    private static (int Durable, int Sectors, int Newer) Verify(string[] lines, long[,] baseline, byte[] data, ref long generation, string where)
    {
        var issued = new Dictionary<long, (int Slot, int Sectors, bool Zero)>();
        var durableBySlot = new Dictionary<int, List<long>>();
        var durable = 0;
        foreach (var line in lines)
        {
            var words = line.Split(' ');
            if (words[0] == "I" && words.Length == 5)
            {
                var gen = long.Parse(words[2], CultureInfo.InvariantCulture);
                issued[gen] = (int.Parse(words[1], CultureInfo.InvariantCulture), int.Parse(words[3], CultureInfo.InvariantCulture), words[4] == "z");
                generation = Math.Max(generation, gen);
            }
            else if (words[0] == "D" && words.Length == 3)
            {
                var slot = int.Parse(words[1], CultureInfo.InvariantCulture);
                (durableBySlot.TryGetValue(slot, out var list) ? list : durableBySlot[slot] = []).Add(long.Parse(words[2], CultureInfo.InvariantCulture));
                durable++;
            }
        }

        var sectors = 0;
        var newer = 0;
        for (var slot = 0; slot < Slots; slot++)
        {
            var writes = issued.Where(w => w.Value.Slot == slot).OrderBy(w => w.Key).ToList();
            var durableHere = durableBySlot.GetValueOrDefault(slot) ?? [];
            for (var index = 0; index < SectorsPerSlot; index++)
            {
                var covering = writes.Where(w => w.Value.Sectors > index).ToList();
                var lastDurable = covering.Where(w => durableHere.Contains(w.Key)).Select(w => w.Key).DefaultIfEmpty(-1).Max();

                // Allowed: the last durable write and those after it; with none durable, what was there and anything issued.
                var allowed = covering.Where(w => w.Key >= lastDurable).ToDictionary(w => w.Key, w => w.Value.Zero);
                var offset = ((long)slot * SlotSize) + (index * 512L);
                var sector = data.AsSpan((int)offset, 512);
                var found = Decode(sector, slot, index, where);
                var ok = found == 0
                    ? allowed.ContainsValue(true) || (lastDurable < 0 && baseline[slot, index] == 0)
                    : (allowed.TryGetValue(found, out var zero) && !zero) || (lastDurable < 0 && baseline[slot, index] == found);
                Assert.True(ok, $"{where}: slot {slot} sector {index} holds {(found == 0 ? "zeroes" : "generation " + found)}; " +
                                $"last durable write {lastDurable}, allowed {string.Join(',', allowed.Keys)}, before {baseline[slot, index]}");
                if (lastDurable >= 0)
                {
                    sectors++;
                    if (found != lastDurable && !(found == 0 && issued[lastDurable].Zero))
                    {
                        newer++;
                    }
                }

                baseline[slot, index] = found;
            }
        }

        return (durable, sectors, newer);
    }

    /// <summary>0 for an all-zero sector, else the generation written in it (the test fails on a torn or foreign sector).</summary>
    private static long Decode(ReadOnlySpan<byte> sector, int slot, int index, string where)
    {
        if (!sector.ContainsAnyExcept((byte)0))
        {
            return 0;
        }

        var gen = BinaryPrimitives.ReadInt64LittleEndian(sector[8..]);
        var fill = (byte)((gen + index) & 0xFF);
        var intact = BinaryPrimitives.ReadUInt64LittleEndian(sector) == Magic &&
                     BinaryPrimitives.ReadInt64LittleEndian(sector[16..]) == slot &&
                     BinaryPrimitives.ReadInt64LittleEndian(sector[24..]) == index &&
                     !sector[32..].ContainsAnyExcept(fill);
        Assert.True(intact, $"{where}: slot {slot} sector {index} is torn or holds another sector's data");
        return gen;
    }

    private static string Script(string name) => Path.Combine(AppContext.BaseDirectory, "python", name);
}
