using Microsoft.Win32.SafeHandles;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Server.Exports;

/// <summary>Opening an image beneath the root (and what it may reach), and closing it.</summary>
public sealed partial class DirectoryExportProvider
{
    private Export? Open(string root, string relative, string name, out string? problem)
    {
        var directory = ConfinedOpen.OpenDirectory(root);
        if (directory < 0)
        {
            problem = -directory == Errno.ENOENT ? "no such image" : $"the image directory cannot be opened (errno {-directory})";
            return null;
        }

        try
        {
            var readOnly = Options.Template.ReadOnly;
            var handle = ConfinedOpen.OpenBeneath(directory, relative, readOnly, out var errno);
            if (handle is null)
            {
                problem = errno switch
                {
                    Errno.ENOENT => "no such image",
                    Errno.EXDEV or Errno.ELOOP => "the name leads outside the export directory",
                    Errno.ENOSYS => "this kernel lacks openat2, which confining names to the directory needs",
                    21 => "that name is a directory, not an image", // EISDIR
                    13 => "permission denied", // EACCES
                    _ => $"cannot open the image (errno {errno})",
                };
                return null;
            }

            var full = Path.Combine(root, relative);
            BlockDevice device;
            try
            {
                device = Options.OpenImage is { } open
                    ? open(new DirectoryImage(handle, full, readOnly, path => OpenBeneathRoot(root, path)))
                    : FileBlockDevice.FromHandle(handle, full, readOnly);
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException or BlockDeviceException)
            {
                problem = exception.Message;
                return null;
            }

            var template = Options.Template;
            var options = new ExportOptions
            {
                Name = name,
                Description = template.Description,
                ReadOnly = template.ReadOnly,
                BlockSizes = template.BlockSizes,
                Rotational = template.Rotational,
                Flush = template.Flush,
                Trim = template.Trim,
                WriteZeroes = template.WriteZeroes,
                MultiConn = template.MultiConn,
                Tls = template.Tls,
                Access = template.Access,
                MaxConnections = template.MaxConnections,
            };
            problem = null;
            return new Export(options, device);
        }
        finally
        {
            ConfinedOpen.CloseDirectory(directory);
        }
    }

    /// <summary>
    /// Opens <paramref name="path"/> read-only if it lies beneath <paramref name="root"/>, with the same openat2
    /// confinement as the images themselves: what a backing file name may reach.
    /// </summary>
    private static SafeFileHandle OpenBeneathRoot(string root, string path)
    {
        var rootFull = Path.GetFullPath(root);
        var relative = Path.GetRelativePath(rootFull, Path.GetFullPath(path));
        if (Path.IsPathRooted(relative) || relative == ".." || relative.StartsWith("../", StringComparison.Ordinal) || !IsSafeRelativeName(relative, out _))
        {
            throw new UnauthorizedAccessException($"'{path}' is outside the export directory");
        }

        var directory = ConfinedOpen.OpenDirectory(rootFull);
        if (directory < 0)
        {
            throw new IOException($"the image directory cannot be opened (errno {-directory})");
        }

        try
        {
            var handle = ConfinedOpen.OpenBeneath(directory, relative, readOnly: true, out var errno);
            return handle ?? throw errno switch
            {
                Errno.ENOENT => new FileNotFoundException($"'{path}' does not exist", path),
                Errno.EXDEV or Errno.ELOOP => new UnauthorizedAccessException($"'{path}' leads outside the export directory"),
                _ => new IOException($"cannot open '{path}' (errno {errno})"),
            };
        }
        finally
        {
            ConfinedOpen.CloseDirectory(directory);
        }
    }

    private static async Task CloseAsync(Export export)
    {
        try
        {
            if (!export.IsReadOnly)
            {
                await export.Device.FlushAsync(CancellationToken.None).ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is BlockDeviceException or IOException)
        {
            // The data was acknowledged already; a failed final flush is the kernel's to retry.
        }

        await export.DisposeAsync().ConfigureAwait(false);
    }
}
