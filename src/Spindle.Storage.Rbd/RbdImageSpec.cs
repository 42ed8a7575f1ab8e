using System.Text;

namespace Spindle.Storage.Rbd;

/// <summary>
/// Which image to open: <c>pool/[namespace/]image[@snapshot]</c>, as the <c>rbd</c> command writes it. A bare
/// <c>image</c> is in the pool named <c>rbd</c>, as for the <c>rbd</c> command.
/// </summary>
public sealed record RbdImageSpec(string Pool, string Namespace, string Image, string? Snapshot)
{
    /// <summary>The pool the <c>rbd</c> command uses when none is named.</summary>
    public const string DefaultPool = "rbd";

    /// <summary>Whether this names a snapshot, which is always served read-only.</summary>
    public bool IsSnapshot => Snapshot is not null;

    /// <summary>Parses <c>pool/[namespace/]image[@snapshot]</c>.</summary>
    /// <exception cref="FormatException">The text is not an image specification.</exception>
    public static RbdImageSpec Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var spec = text;
        string? snapshot = null;
        var at = spec.IndexOf('@', StringComparison.Ordinal);
        if (at >= 0)
        {
            snapshot = spec[(at + 1)..];
            spec = spec[..at];
            if (snapshot.Length == 0 || snapshot.Contains('@', StringComparison.Ordinal) || snapshot.Contains('/', StringComparison.Ordinal))
            {
                throw new FormatException($"'{text}': the snapshot name after '@' must be non-empty and contain no '@' or '/'");
            }
        }

        var parts = spec.Split('/');
        var (pool, nameSpace, image) = parts.Length switch
        {
            1 => (DefaultPool, string.Empty, parts[0]),
            2 => (parts[0], string.Empty, parts[1]),
            3 => (parts[0], parts[1], parts[2]),
            _ => throw new FormatException($"'{text}' is not pool/[namespace/]image[@snapshot]"),
        };
        if (pool.Length == 0 || image.Length == 0 || (parts.Length == 3 && nameSpace.Length == 0))
        {
            throw new FormatException($"'{text}' is not pool/[namespace/]image[@snapshot] (a part is empty)");
        }

        return new RbdImageSpec(pool, nameSpace, image, snapshot);
    }

    /// <summary>
    /// Splits qemu's form <c>pool/image[@snap][:key=value...]</c> into the image and its options. A backslash
    /// escapes the next character, so a value can hold a colon (<c>mon_host=127.0.0.1\:6789</c>).
    /// </summary>
    /// <exception cref="FormatException">An option is not <c>key=value</c>.</exception>
    public static (RbdImageSpec Image, IReadOnlyList<KeyValuePair<string, string>> Options) ParseWithOptions(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var fields = SplitUnescaped(text, ':');
        var image = Parse(fields[0]);
        var options = new List<KeyValuePair<string, string>>();
        foreach (var field in fields.Skip(1))
        {
            var equals = field.IndexOf('=', StringComparison.Ordinal);
            if (equals <= 0)
            {
                throw new FormatException($"'{field}' in '{text}' is not key=value (options follow the image as :key=value)");
            }

            options.Add(new KeyValuePair<string, string>(field[..equals], field[(equals + 1)..]));
        }

        return (image, options);
    }

    /// <summary><c>pool/[namespace/]image[@snapshot]</c>.</summary>
    public override string ToString()
    {
        var builder = new StringBuilder(Pool).Append('/');
        if (Namespace.Length > 0)
        {
            builder.Append(Namespace).Append('/');
        }

        builder.Append(Image);
        if (Snapshot is not null)
        {
            builder.Append('@').Append(Snapshot);
        }

        return builder.ToString();
    }

    private static List<string> SplitUnescaped(string text, char separator)
    {
        var fields = new List<string>();
        var current = new StringBuilder();
        for (var i = 0; i < text.Length; i++)
        {
            var c = text[i];
            if (c == '\\' && i + 1 < text.Length)
            {
                current.Append(text[++i]);
            }
            else if (c == separator)
            {
                fields.Add(current.ToString());
                current.Clear();
            }
            else
            {
                current.Append(c);
            }
        }

        fields.Add(current.ToString());
        return fields;
    }
}
