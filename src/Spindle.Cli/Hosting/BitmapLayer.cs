using Spindle.Storage;
using Spindle.Storage.Layers;
using Spindle.Storage.Qcow2;
using Spindle.Storage.Rbd;

namespace Spindle.Cli.Hosting;

/// <summary>
/// Opens the dirty bitmaps of an export (<c>--bitmap NAME</c>, <c>bitmap = a, b</c>; docs/bitmaps.md) and stacks them
/// on its device. A missing bitmap is created all clean, so the first backup after it must be a full one.
/// </summary>
internal static class BitmapLayer
{
    /// <summary>The granularity of a new bitmap unless one is given: 64 KiB, as qemu's default.</summary>
    public const long DefaultGranularity = 64 * 1024;

    public static BlockDevice Open(ExportDefinition definition, BlockDevice device)
    {
        var layers = definition.Layers;
        var backend = device is LayerDevice layer ? layer.Backend : device;
        if (layers.BitmapGranularity is { } wanted && !DirtyBitmapStore.IsValidGranularity(wanted))
        {
            throw new ConfigurationException($"{definition.Source}: the bitmap granularity must be a power of two from 512 bytes to 1 GiB, not {wanted}");
        }

        if (backend is RbdBlockDevice rbd)
        {
            if (layers.BitmapDirectory is not null)
            {
                throw new ConfigurationException($"{definition.Source}: an RBD image keeps its bitmaps in its own metadata: drop the bitmap directory");
            }

            return Stack(definition, device, name => rbd.OpenBitmap(name, layers.BitmapGranularity ?? DefaultGranularity, device.Size));
        }

        var (path, isBlockDevice) = backend switch
        {
            FileBlockDevice file => (file.Path, file.IsBlockDevice),
            Qcow2Image image => (image.Path, false),
            _ => throw new ConfigurationException($"{definition.Source}: dirty bitmaps are kept for image files, block devices and RBD images, not for {backend.Description}"),
        };

        var location = Locate(path, isBlockDevice, layers.BitmapDirectory, definition.Source);
        return Stack(definition, device, name =>
        {
            var file = location.PathOf(name);
            return File.Exists(file)
                ? OpenExisting(file, definition.Source)
                : FileBitmapStore.Create(file, name, layers.BitmapGranularity ?? DefaultGranularity, device.Size);
        });
    }

    /// <summary>Opens each bitmap of the export through <paramref name="open"/> and stacks them on <paramref name="device"/>.</summary>
    private static DirtyBitmapDevice Stack(ExportDefinition definition, BlockDevice device, Func<string, DirtyBitmapStore> open)
    {
        var layers = definition.Layers;
        var bitmaps = new List<DirtyBitmap>();
        try
        {
            foreach (var name in layers.Bitmaps)
            {
                if (!DirtyBitmapStore.IsValidName(name))
                {
                    throw new ConfigurationException($"{definition.Source}: '{name}' is not a bitmap name (1 to 64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit)");
                }

                if (bitmaps.Any(b => b.Name == name))
                {
                    throw new ConfigurationException($"{definition.Source}: bitmap '{name}' is given twice");
                }

                var store = open(name);
                try
                {
                    if (layers.BitmapGranularity is { } granularity && granularity != store.Granularity)
                    {
                        throw new ConfigurationException($"{definition.Source}: bitmap '{name}' has granularity {store.Granularity}, not {granularity}; drop the granularity or remove the bitmap first (spindle bitmap remove)");
                    }

                    bitmaps.Add(new DirtyBitmap(store));
                }
                catch
                {
                    store.Dispose();
                    throw;
                }
            }

            return new DirtyBitmapDevice(device, bitmaps, ownsInner: true);
        }
        catch (Exception exception)
        {
            foreach (var bitmap in bitmaps)
            {
                bitmap.Dispose();
            }

            if (exception is InvalidDataException or IOException or UnauthorizedAccessException or ArgumentException or BlockDeviceException)
            {
                throw new ConfigurationException($"{definition.Source}: {exception.Message}", exception);
            }

            throw;
        }
    }

    /// <summary>Where <paramref name="path"/>'s bitmaps are; the state directory made when it is the default one.</summary>
    public static BitmapLocation Locate(string path, bool isBlockDevice, string? directory, string source)
    {
        var location = BitmapLocation.For(path, isBlockDevice, directory);
        if (!Directory.Exists(location.Directory))
        {
            if (directory is not null || !isBlockDevice)
            {
                throw new ConfigurationException($"{source}: the bitmap directory '{location.Directory}' does not exist");
            }

            Directory.CreateDirectory(location.Directory);
        }

        return location;
    }

    private static FileBitmapStore OpenExisting(string file, string source)
    {
        try
        {
            return FileBitmapStore.Open(file);
        }
        catch (BitmapInUseException exception)
        {
            throw new ConfigurationException($"{source}: {exception.Message}", exception);
        }
        catch (InvalidDataException exception)
        {
            throw new ConfigurationException($"{source}: refusing the bitmap: {exception.Message}", exception);
        }
    }
}
