using Spindle.Cli.Hosting;
using Spindle.Client;
using Spindle.Storage;
using Spindle.Storage.Qcow2;

namespace Spindle.Cli.Commands;

/// <summary>Opening the two ends of a copy as block devices from what the user named, and describing them.</summary>
internal static partial class CopyCommand
{
    /// <summary>The name of the null device: a sink as the destination, zeroes (<c>null:SIZE</c>) as the source.</summary>
    public const string NullName = "null:";

    /// <summary>What <c>--json</c> says about an end.</summary>
    internal sealed record EndpointSummary(string Kind, long Size, int? Connections, bool Extents);

    /// <summary>An NBD URI (read-only), <c>null:SIZE</c>, or a file or block device (read-only; a qcow2 image through its format).</summary>
    private static async Task<BlockDevice> OpenSourceAsync(string name, CopySettings settings, CancellationToken cancellationToken)
    {
        if (name.StartsWith(NullName, StringComparison.Ordinal))
        {
            var sizeText = name[NullName.Length..];
            return sizeText.Length == 0
                ? throw new FormatException($"{NullName} as the source needs a size: {NullName}SIZE (for example {NullName}1G)")
                : new NullBlockDevice(ClientCommandSupport.ParseSize(sizeText, "source"));
        }

        if (!NbdUri.LooksLikeUri(name))
        {
            // A qcow2 image is read through its format (FILE@SNAPSHOT reads an internal snapshot); anything else raw.
            var (path, snapshot) = ImageBackend.SplitSnapshot(name, ImageFormat.Auto);
            if (!File.Exists(path) && !path.StartsWith("/dev/", StringComparison.Ordinal))
            {
                throw new FileNotFoundException($"source '{name}' does not exist");
            }

            return ImageBackend.Open(path, snapshot is null ? ImageFormat.Auto : ImageFormat.Qcow2, readOnly: true, snapshot: snapshot);
        }

        var options = ClientOptions(settings);
        if (!settings.UseExtents)
        {
            options.MetaContexts.Clear();
        }

        var client = await NbdClient.ConnectAsync(NbdUri.Parse(name), options, cancellationToken).ConfigureAwait(false);
        return new NbdBlockDevice(client, readOnly: true);
    }

    /// <summary>
    /// Opens the destination: <c>null:</c>, an NBD URI (which must be writable), a block device (which must be at
    /// least <paramref name="size"/> bytes), an existing qcow2 image (written into, its virtual size at least
    /// <paramref name="size"/>), an existing regular file (emptied and resized to <paramref name="size"/>, like cp)
    /// or a new sparse file. <c>Emptied</c> is true for a file made or emptied here: it reads as zeroes.
    /// </summary>
    private static async Task<(BlockDevice Device, bool Emptied)> OpenDestinationAsync(string name, long size, CopySettings settings, CancellationToken cancellationToken)
    {
        if (name == NullName)
        {
            return (new NullBlockDevice(size), false);
        }

        if (!NbdUri.LooksLikeUri(name))
        {
            return await OpenDestinationFileAsync(name, size).ConfigureAwait(false);
        }

        var options = ClientOptions(settings);
        options.MetaContexts.Clear();
        var client = await NbdClient.ConnectAsync(NbdUri.Parse(name), options, cancellationToken).ConfigureAwait(false);
        if (client.Export.IsReadOnly)
        {
            await client.DisposeAsync().ConfigureAwait(false);
            throw new NotSupportedException($"the destination export {name} is read-only");
        }

        return (new NbdBlockDevice(client), false);
    }

    private static async Task<(BlockDevice Device, bool Emptied)> OpenDestinationFileAsync(string path, long size)
    {
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (directory is not null && !Directory.Exists(directory))
        {
            throw new DirectoryNotFoundException($"destination directory '{directory}' does not exist");
        }

        if (!File.Exists(path) && !path.StartsWith("/dev/", StringComparison.Ordinal))
        {
            if (path.EndsWith(".qcow2", StringComparison.OrdinalIgnoreCase))
            {
                await Console.Error.WriteLineAsync(
                    $"spindle: warning: creating {path} as a raw file (spindle creates no qcow2 images: to copy into one, make it first with qemu-img create -f qcow2)").ConfigureAwait(false);
            }

            return (FileBlockDevice.Open(path, readOnly: false, createSize: size), true);
        }

        // An existing qcow2 image is a disk to write into, as nbdcopy and qemu-img convert -n write into one served
        // by qemu-nbd: it keeps its format, size, snapshots and backing file; only its contents change.
        if (IsQcow2(path))
        {
            return (ImageBackend.Open(path, ImageFormat.Qcow2, readOnly: false), false);
        }

        var existing = FileBlockDevice.Open(path, readOnly: false);
        if (existing.IsBlockDevice)
        {
            return (existing, false);
        }

        await existing.DisposeAsync().ConfigureAwait(false);
        using (var stream = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
        {
            stream.SetLength(0);
            stream.SetLength(size);
        }

        return (FileBlockDevice.Open(path, readOnly: false), true);
    }

    /// <summary>
    /// <see cref="CopySettings.Connections"/> connections, each with as many request slots as the copy may use, so
    /// the device's <see cref="BlockDevice.QueueDepth"/> is what the copy asked for.
    /// </summary>
    private static NbdClientOptions ClientOptions(CopySettings settings)
    {
        var options = ClientCommandSupport.Options(settings.Connections, deadTimeout: settings.DeadTimeout);
        options.MaxRequestsInFlight = settings.RequestsPerConnection ?? settings.TotalRequests;
        return options;
    }

    private static bool IsQcow2(string path)
    {
        try
        {
            return Qcow2Image.IsQcow2File(path);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    private static EndpointSummary Summarize(BlockDevice device)
    {
        var extents = (device.Features & BlockDeviceFeatures.Extents) != 0;
        return device switch
        {
            NbdBlockDevice nbd => new EndpointSummary("nbd", device.Size, nbd.Client.ConnectionCount, extents),
            FileBlockDevice file => new EndpointSummary(file.IsBlockDevice ? "block device" : "file", device.Size, null, extents),
            NullBlockDevice => new EndpointSummary("null", device.Size, null, false),
            Qcow2Image => new EndpointSummary("qcow2", device.Size, null, extents),
            _ => new EndpointSummary(device.GetType().Name, device.Size, null, extents),
        };
    }
}
