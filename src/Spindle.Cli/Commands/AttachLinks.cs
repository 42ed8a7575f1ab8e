namespace Spindle.Cli.Commands;

/// <summary>
/// The stable names of an attached NBD export as symbolic links to its loop device: RUN/by-uuid/UUID,
/// RUN/by-label/LABEL and RUN/by-serial/SERIAL (RUN is /run/spindle), as udev makes /dev/disk/by-uuid. A script
/// then finds the disk by what it is, never by the loop device number it happened to get.
/// </summary>
internal static class AttachLinks
{
    /// <summary>The link directories under RUN, by the kind of name.</summary>
    public static readonly IReadOnlyList<string> Kinds = ["by-uuid", "by-label", "by-serial"];

    /// <summary>
    /// Makes a link for each name given (null ones skipped) to <paramref name="device"/>, replacing a link of the same
    /// name atomically (the newest attachment of an export wins). Returns the links made; names that cannot be file
    /// names (a '/', a leading '.', control characters) are reported in <paramref name="problems"/> and skipped.
    /// </summary>
    public static IReadOnlyList<string> Create(string device, string? uuid, string? label, string? serial, List<string> problems)
    {
        var made = new List<string>();
        foreach (var (kind, value) in new[] { (Kinds[0], uuid), (Kinds[1], label), (Kinds[2], serial) })
        {
            if (value is null)
            {
                continue;
            }

            if (!IsUsableName(value))
            {
                problems.Add($"no {kind} link for '{value}': it cannot be a file name");
                continue;
            }

            var directory = Path.Combine(AttachPaths.Root, kind);
            var link = Path.Combine(directory, value);
            var temporary = Path.Combine(directory, $".{value}.{Environment.ProcessId}.tmp");
            try
            {
                Directory.CreateDirectory(directory);
                File.Delete(temporary);
                File.CreateSymbolicLink(temporary, device);
                File.Move(temporary, link, overwrite: true);
                made.Add(link);
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
            {
                problems.Add($"cannot make {link}: {exception.Message}");
                TryDelete(temporary);
            }
        }

        return made;
    }

    /// <summary>Removes the links that still point to <paramref name="device"/> (a later attachment may have taken a name over).</summary>
    public static void Remove(IEnumerable<string> links, string device)
    {
        foreach (var link in links)
        {
            try
            {
                var info = new FileInfo(link);
                if (info.LinkTarget == device)
                {
                    info.Delete();
                }
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
            {
                // Best effort: a leftover link is harmless next to a missing device, and the next attach replaces it.
            }
        }
    }

    /// <summary>Removes every link under RUN/by-* that points to <paramref name="device"/> (for an attachment whose state was lost).</summary>
    public static void RemoveAllTo(string device)
    {
        foreach (var kind in Kinds)
        {
            var directory = Path.Combine(AttachPaths.Root, kind);
            if (Directory.Exists(directory))
            {
                Remove(Directory.EnumerateFileSystemEntries(directory), device);
            }
        }
    }

    private static bool IsUsableName(string value) =>
        value.Length is > 0 and <= 255 && value[0] != '.' && !value.Contains('/', StringComparison.Ordinal) && !value.Any(char.IsControl);

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
        }
    }
}
