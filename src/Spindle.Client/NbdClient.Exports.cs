namespace Spindle.Client;

/// <summary>
/// Whether a connection made later (a reconnection, another path) reaches the same export, and the one change of it
/// the client accepts: a larger size, the export grown on the server while the client was away.
/// </summary>
public sealed partial class NbdClient
{
    /// <summary>
    /// What makes <paramref name="other"/> a different export from <paramref name="reference"/> for the purposes of
    /// sending it the same requests, or null when it is the same: a smaller size, flags, block sizes, meta contexts,
    /// and the stable names both servers list.
    /// </summary>
    /// <remarks>
    /// A larger size is the same export grown while the client was away (an RBD image resized online, a file
    /// extended): every request the client could make still fits, so it is accepted, and the client takes the larger
    /// size once all its connections have it (see <see cref="TakeLargerSizeLocked"/>). A smaller one would leave
    /// what the client already knows of past the end.
    /// </remarks>
    internal static string? Disagreement(ExportInfo reference, ExportInfo other)
    {
        if (other.Size < reference.Size)
        {
            return $"size {other.Size} instead of {reference.Size}";
        }

        if (other.Flags != reference.Flags)
        {
            return $"flags {other.Flags} instead of {reference.Flags}";
        }

        if (other.ExtendedHeaders != reference.ExtendedHeaders)
        {
            // Requests longer than 32 bits are only sent whole over extended headers; a path without them cannot take them.
            return other.ExtendedHeaders ? "extended headers where the first server had none" : "no extended headers (the first server had them)";
        }

        if (other.MinimumBlockSize != reference.MinimumBlockSize)
        {
            return $"minimum block size {other.MinimumBlockSize} instead of {reference.MinimumBlockSize}";
        }

        if (other.MaximumPayload < reference.MaximumPayload)
        {
            return $"maximum payload {other.MaximumPayload} instead of {reference.MaximumPayload}";
        }

        if (reference.MetaContexts.Keys.FirstOrDefault(name => !other.MetaContexts.ContainsKey(name)) is { } missing)
        {
            return $"no meta context '{missing}'";
        }

        if (reference.Identity is { } a && other.Identity is { } b)
        {
            foreach (var (what, left, right) in new[] { ("UUID", a.Uuid, b.Uuid), ("label", a.Label, b.Label), ("serial", a.Serial, b.Serial) })
            {
                if (left is not null && right is not null && left != right)
                {
                    return $"{what} {right} instead of {left}";
                }
            }
        }

        return null;
    }

    /// <summary>
    /// The export grew if every connection now open negotiated a larger size than the client has: it takes the
    /// smallest of theirs. While one connection still holds the old size the client keeps it, since a request past
    /// that connection's end would be refused by its server (NBD cannot widen an open connection).
    /// </summary>
    private ExportSizeChangedEventArgs? TakeLargerSizeLocked()
    {
        var smallest = long.MaxValue;
        foreach (var path in _paths)
        {
            foreach (var connection in path.Connections)
            {
                if (connection is not null)
                {
                    smallest = Math.Min(smallest, connection.Export.Size);
                }
            }
        }

        var current = _export;
        if (smallest == long.MaxValue || smallest <= current.Size)
        {
            return null;
        }

        Volatile.Write(ref _export, current with { Size = smallest });
        return new ExportSizeChangedEventArgs(current.Size, smallest);
    }
}
