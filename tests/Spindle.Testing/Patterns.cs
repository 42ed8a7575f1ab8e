namespace Spindle.Testing;

/// <summary>Deterministic test data, so a mismatch can be reproduced.</summary>
public static class Patterns
{
    /// <summary>Bytes that depend on their absolute offset and a seed: every 8-byte word differs.</summary>
    public static byte[] Generate(long offset, int length, int seed = 1)
    {
        var data = new byte[length];
        Fill(data, offset, seed);
        return data;
    }

    public static void Fill(Span<byte> destination, long offset, int seed = 1)
    {
        for (var i = 0; i < destination.Length; i++)
        {
            var position = (ulong)(offset + i);
            var word = (position / 8 * 0x9E3779B97F4A7C15UL) ^ ((ulong)seed * 0xBF58476D1CE4E5B9UL);
            destination[i] = (byte)(word >> (int)(8 * (position % 8)) ^ (byte)seed);
            if (destination[i] == 0)
            {
                destination[i] = 0x5a;
            }
        }
    }

    /// <summary>Random bytes from a fixed seed.</summary>
    public static byte[] Random(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }
}
