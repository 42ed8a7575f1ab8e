using Spindle.Storage;
using Spindle.Storage.Qcow2;

// Usage: Spindle.Qcow2.CrashWriter IMAGE SEED SLOTS SLOT_SIZE
// Opens IMAGE read-write and, in an order drawn from SEED, fills each of SLOTS slots of SLOT_SIZE bytes once with a
// byte pattern (slot, seed). Some writes are FUA, others are buffered and made durable by a FLUSH; some slots are
// zeroed instead. Each write is reported on stdout ("ACK slot offset length byte") only once it is durable, so the
// parent can kill this process at any moment and then check that everything reported reads back. Zeroes and trims of
// other (unreported) ranges keep the metadata busy. Runs until killed or the slots are used up.
var image = args[0];
var seed = int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture);
var slots = int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture);
var slotSize = int.Parse(args[3], System.Globalization.CultureInfo.InvariantCulture);
var random = new Random(seed);
var order = Enumerable.Range(0, slots).OrderBy(_ => random.Next()).ToArray();
var pending = new List<string>();
await using var device = Qcow2Image.Open(image);
var buffer = new byte[slotSize];
Console.Out.Flush();
Console.WriteLine("OPEN");
foreach (var slot in order)
{
    // Write a random sub-range of the slot (so partial clusters and subclusters are exercised).
    var offset = (long)slot * slotSize;
    var start = random.Next(0, slotSize / 2) & ~511;
    var length = Math.Max(512, random.Next(512, slotSize - start + 1) & ~511);
    var value = (byte)(1 + ((slot * 7 + seed) % 250));
    var kind = random.Next(10);
    if (kind == 0)
    {
        await device.WriteZeroesAsync(offset + start, length, ZeroFlags.Fua, CancellationToken.None);
        Console.WriteLine($"ACK {slot} {offset + start} {length} 0 END");
        continue;
    }

    if (kind == 1)
    {
        // Trim the other half of the slot: undefined content, never reported; it frees clusters.
        await device.TrimAsync(offset, start, fua: false, CancellationToken.None);
    }

    Array.Fill(buffer, value, 0, length);
    var fua = random.Next(2) == 0;
    await device.WriteAsync(offset + start, buffer.AsMemory(0, length), fua, CancellationToken.None);
    var line = $"ACK {slot} {offset + start} {length} {value} END";
    if (fua)
    {
        Console.WriteLine(line);
    }
    else
    {
        pending.Add(line);
        if (pending.Count >= 4)
        {
            await device.FlushAsync(CancellationToken.None);
            foreach (var acknowledged in pending)
            {
                Console.WriteLine(acknowledged);
            }

            pending.Clear();
        }
    }
}

Console.WriteLine("DONE");
