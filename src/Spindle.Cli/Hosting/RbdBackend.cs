using Spindle.Storage;
using Spindle.Storage.Rbd;

namespace Spindle.Cli.Hosting;

/// <summary>Maps an export definition with backend "rbd" onto <see cref="RbdOptions"/> and opens the image.</summary>
internal static class RbdBackend
{
    public const string Kind = "rbd";

    public static BlockDevice Open(ExportDefinition definition)
    {
        var where = definition.Source == "command line" ? string.Empty : $"{definition.Source}: ";
        if (string.IsNullOrEmpty(definition.Location))
        {
            throw new ConfigurationException($"{where}an rbd export needs an image: exportname = rbd:pool/image (see docs/rbd.md)");
        }

        RbdOptions options;
        try
        {
            options = RbdOptions.Create(definition.Location, definition.Settings, definition.Options.ReadOnly);
            options.Logger = BackendFactory.Logging?.CreateLogger("Spindle.Rbd");
        }
        catch (FormatException exception)
        {
            throw new ConfigurationException($"{where}{exception.Message}");
        }

        try
        {
            return RbdBlockDevice.Open(options);
        }
        catch (RbdOpenException exception)
        {
            throw new ConfigurationException($"{where}rbd:{options.Image}: {exception.Message}");
        }
    }
}
