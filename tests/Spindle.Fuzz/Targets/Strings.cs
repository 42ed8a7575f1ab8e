using System.Text;
using Spindle.Fuzz.Support;
using Spindle.Protocol;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// Protocol strings (proto.md "Conventions": UTF-8, no NUL, at most 4096 bytes) and the stable-name meta-context
/// names made from them. Invariant: no exception; a decoded string keeps the rules and encodes back to the same bytes;
/// a refusal says why; a split stable name joins back to the same name.
/// </summary>
[Covers(typeof(NbdString), nameof(NbdString.TryDecode))]
[Covers(typeof(StableNames), nameof(StableNames.TryParseMetaContext))]
public sealed class Strings : FuzzTarget
{
    public override void Run(byte[] input)
    {
        if (NbdString.TryDecode(input, out var value, out var problem))
        {
            Check.That(problem is null, "a decoded string with a problem");
            CheckProtocolString(value, "decoded string");
            Check.Same(input, Encoding.UTF8.GetBytes(value), "string re-encoded");
        }
        else
        {
            Check.That(!string.IsNullOrEmpty(problem) && value.Length == 0, "a refused string without a reason, or with a value");
        }

        var text = Encoding.UTF8.GetString(input);
        if (StableNames.TryParseMetaContext(text, out var key, out var name))
        {
            Check.That(StableNames.MetaContext(key, name) == text, $"stable name '{text}' split into '{key}' and '{name}'");
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        yield return ("ascii", "exports/disk-1"u8.ToArray());
        yield return ("utf8", Encoding.UTF8.GetBytes("dísk-ü-日本"));
        yield return ("stable-name", Encoding.UTF8.GetBytes(StableNames.MetaContext(StableNames.UuidKey, "0f5e1c52-8a4b-4c3e-9d7a-2b6c1e0f9a11")));
    }

    /// <summary>The rules every string a parser hands out must keep.</summary>
    internal static void CheckProtocolString(string value, string what)
    {
        Check.That(!value.Contains('\0', StringComparison.Ordinal), $"{what} contains NUL");
        Check.That(Encoding.UTF8.GetByteCount(value) <= NbdLimits.MaxStringLength, $"{what} is longer than 4096 bytes");
        NbdString.Validate(value, what);
    }
}
