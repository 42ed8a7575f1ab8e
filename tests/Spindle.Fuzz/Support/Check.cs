namespace Spindle.Fuzz.Support;

/// <summary>The small assertions targets make; a failure is an <see cref="InvariantViolation"/>.</summary>
internal static class Check
{
    public static void That(bool condition, string what)
    {
        if (!condition)
        {
            throw new InvariantViolation(what);
        }
    }

    public static void Same(ReadOnlySpan<byte> expected, ReadOnlySpan<byte> actual, string what)
    {
        if (!expected.SequenceEqual(actual))
        {
            throw new InvariantViolation($"{what}: expected {Convert.ToHexString(expected)}, got {Convert.ToHexString(actual)}");
        }
    }

    /// <summary>
    /// A fixed-size header parser never parses a prefix shorter than the header, and parses the
    /// header alone (no byte after it read) to the same result.
    /// </summary>
    public static void PrefixStable<T>(ReadOnlySpan<byte> input, int length, Parser<T> parse, string what)
        where T : struct
    {
        var status = parse(input, out var whole);
        if (input.Length < length)
        {
            That(status != Protocol.ParseStatus.Done, $"{what}: {input.Length} bytes of a {length}-byte header parsed");
            return;
        }

        var exact = parse(input[..length], out var alone);
        That(exact == status && alone.Equals(whole), $"{what}: the header alone parsed to {exact} {alone}, with what follows to {status} {whole}");
        That(parse(input[..(length - 1)], out _) != Protocol.ParseStatus.Done, $"{what}: parsed from {length - 1} bytes");
    }

    public delegate Protocol.ParseStatus Parser<T>(ReadOnlySpan<byte> source, out T value);
}
