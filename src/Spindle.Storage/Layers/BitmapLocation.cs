namespace Spindle.Storage.Layers;

/// <summary>
/// Where the bitmap files of an image live (docs/bitmaps.md). One file per bitmap, named <c>KEY.NAME.spindle-bitmap</c>:
/// <list type="bullet">
/// <item>an image file, no state directory given: beside the image, KEY its file name (<c>disk.img.backup.spindle-bitmap</c>);</item>
/// <item>a block device, or any image with a state directory (<c>--bitmap-dir</c>, default for devices
/// <see cref="DefaultStateDirectory"/>): in that directory, KEY the device's first <c>/dev/disk/by-id</c> name
/// (stable across reboots, unlike sdb), else the image's full resolved path with '%' and '/' escaped as %25 and %2F.</item>
/// </list>
/// </summary>
public sealed record BitmapLocation(string Directory, string Key)
{
    /// <summary>The state directory of block devices when none is given.</summary>
    public const string DefaultStateDirectory = "/var/lib/spindle/bitmaps";

    /// <summary>The ending of every bitmap file name.</summary>
    public const string Suffix = ".spindle-bitmap";

    /// <summary>Where the bitmaps of <paramref name="imagePath"/> are kept.</summary>
    public static BitmapLocation For(string imagePath, bool isBlockDevice, string? stateDirectory)
    {
        ArgumentNullException.ThrowIfNull(imagePath);
        var full = Resolve(Path.GetFullPath(imagePath));
        if (!isBlockDevice && stateDirectory is null)
        {
            return new BitmapLocation(Path.GetDirectoryName(full)!, Path.GetFileName(full));
        }

        var directory = stateDirectory ?? DefaultStateDirectory;
        var key = isBlockDevice ? DeviceId(full) : null;
        return new BitmapLocation(directory, key ?? full.Replace("%", "%25", StringComparison.Ordinal).Replace("/", "%2F", StringComparison.Ordinal));
    }

    /// <summary>The file of bitmap <paramref name="name"/>.</summary>
    public string PathOf(string name) => Path.Combine(Directory, $"{Key}.{name}{Suffix}");

    /// <summary>The names of the bitmaps present, sorted.</summary>
    public IReadOnlyList<string> Names()
    {
        if (!System.IO.Directory.Exists(Directory))
        {
            return [];
        }

        var prefix = Key + ".";
        var names = new List<string>();
        foreach (var file in System.IO.Directory.EnumerateFiles(Directory))
        {
            var fileName = Path.GetFileName(file);
            if (fileName.StartsWith(prefix, StringComparison.Ordinal) && fileName.EndsWith(Suffix, StringComparison.Ordinal) &&
                fileName.Length > prefix.Length + Suffix.Length)
            {
                var name = fileName[prefix.Length..^Suffix.Length];
                if (DirtyBitmapStore.IsValidName(name))
                {
                    names.Add(name);
                }
            }
        }

        names.Sort(StringComparer.Ordinal);
        return names;
    }

    /// <summary>Whether <paramref name="path"/> is a block device (false when it cannot be opened to tell).</summary>
    public static bool IsBlockDevice(string path)
    {
        try
        {
            using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            return Native.LinuxFile.IsBlockDevice(handle);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    private static string Resolve(string path)
    {
        try
        {
            return File.ResolveLinkTarget(path, returnFinalTarget: true)?.FullName ?? path;
        }
        catch (IOException)
        {
            return path;
        }
    }

    /// <summary>The first /dev/disk/by-id name of the device, in ordinal order, or null.</summary>
    private static string? DeviceId(string device)
    {
        const string byId = "/dev/disk/by-id";
        if (!System.IO.Directory.Exists(byId))
        {
            return null;
        }

        var names = System.IO.Directory.EnumerateFileSystemEntries(byId).Where(link => Resolve(link) == device).Select(Path.GetFileName).ToList();
        names.Sort(StringComparer.Ordinal);
        return names.Count > 0 ? names[0] : null;
    }
}
