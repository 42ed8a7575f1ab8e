using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Server.Exports;

/// <summary>
/// Stable names for exports: a UUID kept across restarts, and optional labels and serials. Clients can ask for
/// <c>by-uuid/UUID</c>, <c>by-label/LABEL</c> or <c>by-serial/SERIAL</c> instead of a name that may change, as
/// /dev/disk/by-* does for local disks.
/// </summary>
public static partial class ExportIdentity
{
    public const string ByUuid = StableNames.ByUuid;
    public const string ByLabel = StableNames.ByLabel;
    public const string BySerial = StableNames.BySerial;

    /// <summary>
    /// The metadata-context namespace that carries an export's stable names. NBD_OPT_LIST_META_CONTEXT with the
    /// query <c>x-spindle:</c> answers <c>x-spindle:uuid=UUID</c>, <c>x-spindle:label=LABEL</c> and
    /// <c>x-spindle:serial=SERIAL</c>. They describe the export and cannot be selected; the x- namespace is the one the
    /// NBD spec leaves to implementations, and only an explicit query returns them.
    /// </summary>
    public const string MetaNamespace = StableNames.MetaNamespace;

    private const string Attribute = "user.spindle.uuid";

    [LibraryImport("libc", EntryPoint = "getxattr", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial nint GetXattr(string path, string name, Span<byte> value, nuint size);

    [LibraryImport("libc", EntryPoint = "setxattr", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int SetXattr(string path, string name, ReadOnlySpan<byte> value, nuint size, int flags);

    /// <summary>Whether a label or serial can be used in a by-label/ or by-serial/ name.</summary>
    public static bool IsValidTag(string value, out string? problem)
    {
        if (string.IsNullOrEmpty(value) || value.Length > 128)
        {
            problem = "must be 1 to 128 characters";
            return false;
        }

        foreach (var character in value)
        {
            if (!(char.IsAsciiLetterOrDigit(character) || character is '-' or '_' or '.' or ':' or '+' or '@'))
            {
                problem = $"may only contain letters, digits and - _ . : + @ (not '{character}')";
                return false;
            }
        }

        problem = null;
        return true;
    }

    /// <summary>
    /// The export's UUID: the configured one, else one generated once and kept. For a regular file it is kept in the
    /// file's <c>user.spindle.uuid</c> extended attribute, so it follows the file; otherwise (block devices, other
    /// backends, file systems without user xattrs) in <paramref name="stateDirectory"/>/exports.json keyed by the
    /// backend's description. A memory disk gets a new one each run. The returned note says where it came from.
    /// </summary>
    public static Guid Assign(ExportOptions options, BlockDevice device, string? stateDirectory, out string note)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(device);
        if (options.Uuid is { } configured)
        {
            note = "configured";
            return configured;
        }

        if (device is MemoryBlockDevice)
        {
            note = "new each run (memory disk)";
            return Guid.NewGuid();
        }

        if (device is FileBlockDevice { IsBlockDevice: false } file && TryFileAttribute(file.Path, out var fromFile, out var created))
        {
            note = created ? $"new, kept in {file.Path}'s {Attribute} attribute" : $"from {file.Path}'s {Attribute} attribute";
            return fromFile;
        }

        if (stateDirectory is not null)
        {
            var key = device is FileBlockDevice f ? f.Path : device.Description;
            var fromState = FromStateFile(stateDirectory, key, out created);
            note = created ? $"new, kept in {Path.Combine(stateDirectory, "exports.json")}" : $"from {Path.Combine(stateDirectory, "exports.json")}";
            return fromState;
        }

        note = "new each run (no place to keep it: set uuid in the configuration)";
        return Guid.NewGuid();
    }

    /// <summary>The default state directory: /var/lib/spindle for root, else $XDG_STATE_HOME/spindle.</summary>
    public static string DefaultStateDirectory()
    {
        if (Environment.UserName == "root")
        {
            return "/var/lib/spindle";
        }

        var state = Environment.GetEnvironmentVariable("XDG_STATE_HOME");
        return Path.Combine(string.IsNullOrEmpty(state) ? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".local", "state") : state, "spindle");
    }

    private static bool TryFileAttribute(string path, out Guid uuid, out bool created)
    {
        created = false;
        Span<byte> buffer = stackalloc byte[64];
        var length = GetXattr(path, Attribute, buffer, (nuint)buffer.Length);
        if (length > 0 && Guid.TryParse(Encoding.ASCII.GetString(buffer[..(int)length]), out uuid))
        {
            return true;
        }

        uuid = Guid.NewGuid();
        var text = Encoding.ASCII.GetBytes(uuid.ToString("D"));
        if (SetXattr(path, Attribute, text, (nuint)text.Length, 0) == 0)
        {
            created = true;
            return true;
        }

        // No user xattrs here (or a read-only file system): the caller falls back to the state file.
        return false;
    }

    private static readonly Lock StateLock = new();

    private static Guid FromStateFile(string directory, string key, out bool created)
    {
        lock (StateLock)
        {
            Directory.CreateDirectory(directory);
            var path = Path.Combine(directory, "exports.json");
            var map = File.Exists(path)
                ? JsonSerializer.Deserialize(File.ReadAllText(path), ExportIdentityJson.Default.DictionaryStringGuid) ?? []
                : new Dictionary<string, Guid>();
            if (map.TryGetValue(key, out var uuid))
            {
                created = false;
                return uuid;
            }

            uuid = Guid.NewGuid();
            map[key] = uuid;
            var temporary = path + ".tmp";
            File.WriteAllText(temporary, JsonSerializer.Serialize(map, ExportIdentityJson.Default.DictionaryStringGuid));
            File.Move(temporary, path, overwrite: true);
            created = true;
            return uuid;
        }
    }
}

/// <summary>
/// The state file's JSON (exports.json: key -> UUID), source-generated so the serializer needs no reflection (the
/// spindle command is compiled ahead of time). Indented, as the file was always written.
/// </summary>
[JsonSerializable(typeof(Dictionary<string, Guid>))]
[JsonSourceGenerationOptions(WriteIndented = true)]
internal sealed partial class ExportIdentityJson : JsonSerializerContext;
