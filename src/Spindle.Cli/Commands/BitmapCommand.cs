using System.CommandLine;
using System.Globalization;
using Spindle.Cli.Hosting;
using Spindle.Storage.Layers;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle bitmap list|add|clear|remove IMAGE [NAME]</c>: manages the dirty bitmaps <c>spindle serve --bitmap</c>
/// keeps of an image (docs/bitmaps.md). Changing a bitmap a running server holds is refused (the server locks its
/// bitmap files); listing one is fine, since every acknowledged bit is already on disk.
/// </summary>
internal static class BitmapCommand
{
    private const string Examples = """
        Manage the crash-safe dirty bitmaps spindle serve --bitmap keeps of an image file or block device
        (docs/bitmaps.md). add, clear and remove refuse while a server holds the bitmap. A new or cleared bitmap is
        all clean: the backup that follows must have started from a full copy.

        Examples:
          spindle bitmap list disk.img
          spindle bitmap list --json /dev/sdb
          spindle bitmap add disk.img backup --granularity 1M
          spindle bitmap clear disk.img backup
          spindle bitmap remove disk.img backup
        """;

    public static Command Create()
    {
        var command = new Command("bitmap", Examples);
        var directoryOption = new Option<string?>("--bitmap-dir") { Description = "Where the bitmap files are [default: beside IMAGE; /var/lib/spindle/bitmaps for a block device]." };

        var json = new Option<bool>("--json") { Description = "Print the list as JSON." };
        var listImage = ImageArgument();
        var list = new Command("list", "List the bitmaps of IMAGE: name, granularity, dirty bytes, whether a server holds it.") { listImage, directoryOption, json };
        list.SetAction(parse => Run(() => List(parse.GetValue(listImage)!, parse.GetValue(directoryOption), parse.GetValue(json))));

        var granularity = new Option<string?>("--granularity") { Description = "Bytes one bit covers, a power of two of 512 or more (e.g. 64K) [default: 64K]." };
        var addImage = ImageArgument();
        var addName = NameArgument();
        var add = new Command("add", "Create an all-clean bitmap NAME for IMAGE.") { addImage, addName, granularity, directoryOption };
        add.SetAction(parse => Run(() => Add(parse.GetValue(addImage)!, parse.GetValue(addName)!, parse.GetValue(granularity), parse.GetValue(directoryOption))));

        var clearImage = ImageArgument();
        var clearName = NameArgument();
        var clear = new Command("clear", "Mark every range of bitmap NAME clean (after a backup).") { clearImage, clearName, directoryOption };
        clear.SetAction(parse => Run(() => Change(parse.GetValue(clearImage)!, parse.GetValue(clearName)!, parse.GetValue(directoryOption), remove: false)));

        var removeImage = ImageArgument();
        var removeName = NameArgument();
        var remove = new Command("remove", "Delete bitmap NAME (a damaged one too).") { removeImage, removeName, directoryOption };
        remove.SetAction(parse => Run(() => Change(parse.GetValue(removeImage)!, parse.GetValue(removeName)!, parse.GetValue(directoryOption), remove: true)));

        command.Subcommands.Add(list);
        command.Subcommands.Add(add);
        command.Subcommands.Add(clear);
        command.Subcommands.Add(remove);
        return command;
    }

    private static Argument<string> ImageArgument() => new("image") { Description = "The image file or block device." };

    private static Argument<string> NameArgument() => new("name") { Description = "The bitmap's name (its metadata context is qemu:dirty-bitmap:NAME)." };

    private static int Run(Func<int> action)
    {
        try
        {
            return action();
        }
        catch (ConfigurationException exception)
        {
            return CliErrors.Usage(exception.Message);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException or InvalidDataException or ArgumentException or Spindle.Storage.BlockDeviceException)
        {
            return CliErrors.Fail(exception.Message);
        }
    }

    private static BitmapLocation Locate(string image, string? directory)
    {
        if (!File.Exists(image) && !BitmapLocation.IsBlockDevice(image))
        {
            throw new ConfigurationException($"'{image}' does not exist");
        }

        return BitmapLayer.Locate(image, BitmapLocation.IsBlockDevice(image), directory, "spindle bitmap");
    }

    private static string CheckedName(string name) => DirtyBitmapStore.IsValidName(name)
        ? name
        : throw new ConfigurationException($"'{name}' is not a bitmap name (1 to 64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit)");

    private static int List(string image, string? directory, bool json)
    {
        var location = Locate(image, directory);
        var rows = new List<(string Name, long Granularity, long Dirty, long Size, bool InUse, string? Problem)>();
        foreach (var name in location.Names())
        {
            try
            {
                using var bitmap = new DirtyBitmap(FileBitmapStore.Open(location.PathOf(name), writable: false));
                rows.Add((name, bitmap.Granularity, bitmap.DirtyBytes, bitmap.ImageSize, ((FileBitmapStore)bitmap.Store).InUse, null));
            }
            catch (Exception exception) when (exception is InvalidDataException or IOException or UnauthorizedAccessException)
            {
                rows.Add((name, 0, 0, 0, false, exception.Message));
            }
        }

        if (json)
        {
            InfoCommand.WriteJson(Console.Out, writer =>
            {
                writer.WriteStartArray();
                foreach (var row in rows)
                {
                    writer.WriteStartObject();
                    writer.WriteString("name", row.Name);
                    writer.WriteString("file", location.PathOf(row.Name));
                    if (row.Problem is not null)
                    {
                        writer.WriteString("error", row.Problem);
                    }
                    else
                    {
                        writer.WriteNumber("granularity", row.Granularity);
                        writer.WriteNumber("dirty_bytes", row.Dirty);
                        writer.WriteNumber("image_size", row.Size);
                        writer.WriteBoolean("in_use", row.InUse);
                    }

                    writer.WriteEndObject();
                }

                writer.WriteEndArray();
            });
        }
        else
        {
            Console.WriteLine($"{"NAME",-24} {"GRANULARITY",12} {"DIRTY BYTES",16} {"SIZE",16}  STATE");
            foreach (var row in rows)
            {
                Console.WriteLine(row.Problem is not null
                    ? $"{row.Name,-24} {"-",12} {"-",16} {"-",16}  damaged: {row.Problem}"
                    : string.Create(CultureInfo.InvariantCulture, $"{row.Name,-24} {row.Granularity,12} {row.Dirty,16} {row.Size,16}  {(row.InUse ? "in use" : "idle")}"));
            }
        }

        return rows.Any(row => row.Problem is not null) ? CliErrors.Failure : 0;
    }

    private static int Add(string image, string name, string? granularityText, string? directory)
    {
        CheckedName(name);
        var granularity = granularityText is null ? BitmapLayer.DefaultGranularity : SizeParser.Parse(granularityText, "--granularity");
        if (!DirtyBitmapStore.IsValidGranularity(granularity))
        {
            throw new ConfigurationException($"--granularity must be a power of two from 512 bytes to 1 GiB, not {granularity}");
        }

        var location = Locate(image, directory);
        var path = location.PathOf(name);
        if (File.Exists(path))
        {
            return CliErrors.Fail($"bitmap '{name}' of '{image}' exists already ({path})");
        }

        var device = ImageBackend.Open(image, ImageFormat.Auto, readOnly: true);
        var size = device.Size;
        device.DisposeAsync().AsTask().GetAwaiter().GetResult();

        using var store = FileBitmapStore.Create(path, name, granularity, size);
        Console.WriteLine($"created bitmap '{name}' ({path}): all clean, so the next backup must start from a full copy");
        return 0;
    }

    private static int Change(string image, string name, string? directory, bool remove)
    {
        CheckedName(name);
        var path = Locate(image, directory).PathOf(name);
        if (!File.Exists(path))
        {
            return CliErrors.Fail($"'{image}' has no bitmap '{name}' ({path} does not exist)");
        }

        if (remove)
        {
            FileBitmapStore.Remove(path);
            Console.WriteLine($"removed bitmap '{name}'");
        }
        else
        {
            using var store = FileBitmapStore.Open(path);
            store.Clear();
            Console.WriteLine($"cleared bitmap '{name}'");
        }

        return 0;
    }
}
