using Microsoft.Extensions.Logging;
using Spindle.Storage;

namespace Spindle.Cli.Hosting;

/// <summary>Opens the backend an export definition names. Backends in their own assemblies register here.</summary>
internal static class BackendFactory
{
    private static readonly Dictionary<string, Func<ExportDefinition, BlockDevice>> Extra = new(StringComparer.OrdinalIgnoreCase);

    /// <summary>
    /// Where backends that log while they serve (an RBD image reporting a resize) send their lines: the server's
    /// logging, set when the server host starts. Null (commands that are not a server): they log nothing.
    /// </summary>
    public static ILoggerFactory? Logging { get; set; }

    public static void Register(string kind, Func<ExportDefinition, BlockDevice> open) => Extra[kind] = open;

    public static BlockDevice Open(ExportDefinition definition)
    {
        switch (definition.Backend)
        {
            case "file":
                // Raw or qcow2 (detected, or given with --format / format =), an internal snapshot as FILE@SNAP.
                return ImageBackend.OpenExport(definition);

            case "memory":
                var size = definition.Size ?? throw new ConfigurationException($"{definition.Source}: a memory export needs a size");
                if (size > MemoryBlockDevice.MaxSize)
                {
                    throw new ConfigurationException($"{definition.Source}: memory exports are limited to 16 TiB");
                }

                return new MemoryBlockDevice(size, definition.Options.ReadOnly);
            default:
                if (Extra.TryGetValue(definition.Backend, out var open))
                {
                    return open(definition);
                }

                throw new ConfigurationException($"{definition.Source}: unknown backend '{definition.Backend}' (known: file, memory{string.Concat(Extra.Keys.Select(k => ", " + k))})");
        }
    }
}
