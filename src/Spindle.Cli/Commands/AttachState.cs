using System.Text.Json;
using System.Text.Json.Serialization;
using Spindle.Fuse.Devices;

namespace Spindle.Cli.Commands;

/// <summary>
/// What <c>spindle attach</c> records about one attachment, in RUN/NAME.json (RUN is /run/spindle): the background
/// mount server's pid, the mount point RUN/mnt/NAME, the file in it and the loop device bound to that file.
/// The attaching command creates it (reserving the name), the server fills it in, <c>spindle detach</c> removes it.
/// </summary>
internal sealed record AttachState
{
    public const string Starting = "starting";
    public const string Ready = "ready";
    public const string Failed = "failed";

    public required string Name { get; init; }

    public string Phase { get; init; } = Starting;

    /// <summary>The mount server's pid (the attaching command's own pid until the server has started).</summary>
    public int Pid { get; init; }

    public string? Source { get; init; }

    public string? MountPoint { get; init; }

    public string? File { get; init; }

    public string? LoopDevice { get; init; }

    /// <summary>"fuse" (a FUSE file on a loop device) or "nbd" (the kernel's NBD device); null in states of older versions: fuse.</summary>
    public string? Kind { get; init; }

    /// <summary>/dev/nbdN of an nbd attachment.</summary>
    public string? NbdDevice { get; init; }

    /// <summary>An nbd attachment's data path: "direct" or "relay".</summary>
    public string? Mode { get; init; }

    /// <summary>Sockets the kernel holds for an nbd attachment (what an adoption must account for).</summary>
    public int Connections { get; init; }

    /// <summary>The background process's arguments, so <c>attach --adopt</c> can start it again alike.</summary>
    public IReadOnlyList<string>? Arguments { get; init; }

    /// <summary>The block device users see: /dev/nbdN or /dev/loopN.</summary>
    [System.Text.Json.Serialization.JsonIgnore]
    public string? Device => NbdDevice ?? LoopDevice;

    public bool ReadOnly { get; init; }

    public string? Error { get; init; }

    /// <summary>The stable-name links made to <see cref="LoopDevice"/> (RUN/by-uuid/..., see <see cref="AttachLinks"/>).</summary>
    public IReadOnlyList<string>? Links { get; init; }

    public DateTimeOffset? Started { get; init; }

    /// <summary>Whether the process recorded in <see cref="Pid"/> is alive and is a spindle attach.</summary>
    public bool IsOwnerAlive() =>
        DaemonProcess.IsAlive(Pid) && DaemonProcess.CommandLine(Pid).Any(argument => argument == "attach");

    /// <summary>Creates the state file for <paramref name="name"/> if there is none: false if it already exists.</summary>
    public static bool TryReserve(string name, int pid)
    {
        try
        {
            using var stream = new FileStream(AttachPaths.State(name), FileMode.CreateNew, FileAccess.Write);
            JsonSerializer.Serialize(stream, new AttachState { Name = name, Pid = pid, Started = DateTimeOffset.UtcNow }, AttachStateJson.Default.AttachState);
            return true;
        }
        catch (IOException) when (System.IO.File.Exists(AttachPaths.State(name)))
        {
            return false;
        }
    }

    /// <summary>The state of <paramref name="name"/>, or null if there is none (or it is unreadable).</summary>
    public static AttachState? Load(string name)
    {
        try
        {
            using var stream = System.IO.File.OpenRead(AttachPaths.State(name));
            return JsonSerializer.Deserialize(stream, AttachStateJson.Default.AttachState);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException or JsonException)
        {
            return null;
        }
    }

    /// <summary>Every recorded attachment.</summary>
    public static IEnumerable<AttachState> LoadAll()
    {
        if (!Directory.Exists(AttachPaths.Root))
        {
            yield break;
        }

        foreach (var path in Directory.EnumerateFiles(AttachPaths.Root, "*.json"))
        {
            if (Load(Path.GetFileNameWithoutExtension(path)) is { } state)
            {
                yield return state;
            }
        }
    }

    /// <summary>Replaces the state file atomically (write aside, rename).</summary>
    public void Save()
    {
        var path = AttachPaths.State(Name);
        var temporary = $"{path}.{Environment.ProcessId}.tmp";
        using (var stream = new FileStream(temporary, FileMode.Create, FileAccess.Write))
        {
            JsonSerializer.Serialize(stream, this, AttachStateJson.Default.AttachState);
        }

        System.IO.File.Move(temporary, path, overwrite: true);
    }
}

/// <summary>Where attachments live: RUN (/run/spindle, or $SPINDLE_RUN_DIR), RUN/mnt/NAME, RUN/NAME.json, RUN/NAME.log.</summary>
internal static class AttachPaths
{
    public static string Root => Environment.GetEnvironmentVariable("SPINDLE_RUN_DIR") is { Length: > 0 } custom ? custom : "/run/spindle";

    public static string MountRoot => Path.Combine(Root, "mnt");

    public static string MountPoint(string name) => Path.Combine(MountRoot, name);

    public static string State(string name) => Path.Combine(Root, name + ".json");

    public static string Log(string name) => Path.Combine(Root, name + ".log");

    /// <summary>Names become directory and file names: letters, digits, '.', '_' and '-', not starting with '.'.</summary>
    public static bool IsValidName(string name) =>
        name.Length is > 0 and <= 64 && name[0] != '.' && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-');

    /// <summary>The attachment name a path inside RUN/mnt belongs to, or null.</summary>
    public static string? NameOfMountPath(string path)
    {
        var prefix = MountRoot.TrimEnd('/') + "/";
        if (!path.StartsWith(prefix, StringComparison.Ordinal))
        {
            return null;
        }

        var rest = path[prefix.Length..];
        var slash = rest.IndexOf('/', StringComparison.Ordinal);
        var name = slash < 0 ? rest : rest[..slash];
        return IsValidName(name) ? name : null;
    }
}

[JsonSerializable(typeof(AttachState))]
[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
internal sealed partial class AttachStateJson : JsonSerializerContext;
