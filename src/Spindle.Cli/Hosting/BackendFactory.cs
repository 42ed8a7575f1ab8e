using Spindle.Storage;

namespace Spindle.Cli.Hosting;

/// <summary>Opens the backend an export definition names. Backends in their own assemblies register here.</summary>
internal static class BackendFactory
{
    private static readonly Dictionary<string, Func<ExportDefinition, BlockDevice>> Extra = new(StringComparer.OrdinalIgnoreCase);

    public static void Register(string kind, Func<ExportDefinition, BlockDevice> open) => Extra[kind] = open;

    public static BlockDevice Open(ExportDefinition definition)
    {
        switch (definition.Backend)
        {
            case "file":
                var path = definition.Location ?? throw new ConfigurationException($"{definition.Source}: no file to serve");
                try
                {
                    return FileBlockDevice.Open(path, definition.Options.ReadOnly, definition.Size);
                }
                catch (FileNotFoundException)
                {
                    throw new ConfigurationException($"'{path}' does not exist (give a size to create it: --create SIZE on the command line, filesize = SIZE in a configuration file)");
                }
                catch (UnauthorizedAccessException exception)
                {
                    var hint = definition.Options.ReadOnly ? string.Empty : " (serve it read-only with -r if you may only read it)";
                    throw new ConfigurationException($"cannot open '{path}': {exception.Message}{hint}");
                }
                catch (IOException exception)
                {
                    throw new ConfigurationException($"cannot open '{path}': {exception.Message}");
                }

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
