namespace Spindle.Bench;

/// <summary>
/// The images of the layer rows (issue 14). An overlay needs nothing of its own: <c>--cow</c> opens the raw image
/// read-only and keeps a fresh temporary overlay per server process, and every run starts a fresh process. A dirty
/// bitmap is kept beside the image it records and outlives the server, so a bitmap row serves a copy of its own whose
/// bitmap is deleted with every fresh copy: each write run starts with every bit clean and pays for the first write to
/// each region, as a bitmap does after a backup clears it. A persistent overlay (<c>--overlay</c>, a qcow2 image
/// backed by the served copy) is such a file beside the copy too: each write run starts with an empty overlay, so its
/// writes allocate clusters (copying the rest of each 64 KiB cluster up from the base), as in a new overlay.
/// </summary>
internal static class LayerImages
{
    /// <summary>The raw image, copied per server, with the files a layer keeps beside the copy removed on every renewal.</summary>
    public static readonly ImageSpec Bitmap = new("raw-bitmap", (raw, _) => Task.FromResult(raw))
    {
        CopyPerServer = true,
        Renewed = RemoveSidecars,
    };

    /// <summary>Deletes every file named after the served copy plus a suffix (<c>SERVER.served.*</c>): what a layer keeps beside an image.</summary>
    private static void RemoveSidecars(string copy)
    {
        // Filtered by hand: the pattern "NAME.*" also matches NAME itself (Win32 wildcard rules, which .NET keeps).
        var directory = Path.GetDirectoryName(copy)!;
        var prefix = Path.GetFileName(copy) + ".";
        foreach (var sidecar in Directory.EnumerateFileSystemEntries(directory).Where(p => Path.GetFileName(p).StartsWith(prefix, StringComparison.Ordinal)).ToList())
        {
            if (Directory.Exists(sidecar))
            {
                Directory.Delete(sidecar, recursive: true);
            }
            else
            {
                File.Delete(sidecar);
            }
        }
    }
}
