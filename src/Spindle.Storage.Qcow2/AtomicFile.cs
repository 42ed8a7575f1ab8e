using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Spindle.Storage.Qcow2;

/// <summary>
/// Creates a file so that it appears whole or not at all, and never in place of a file that exists: the bytes go to
/// a temporary name in the same directory, are made durable (fsync), and the temporary name is then renamed to the
/// final one with <c>renameat2(RENAME_NOREPLACE)</c> (or <c>link</c> + <c>unlink</c> where the file system lacks it),
/// and the directory is synced so the new name survives a power cut too.
/// </summary>
/// <remarks>
/// A crash at any point leaves either no file under the final name, or the complete one; at worst a temporary file
/// named <c>.NAME.XXXXXXXX.tmp</c> remains beside it. A plain <c>rename</c> would silently replace a file created
/// under the same name in the meantime (another server, or qemu-img create), which for an image means losing it.
/// </remarks>
internal static partial class AtomicFile
{
    private const int AtFdCwd = -100; // AT_FDCWD
    private const uint RenameNoReplace = 1; // RENAME_NOREPLACE
    private const int OpenReadOnlyCloseOnExec = 0x80000; // O_RDONLY | O_CLOEXEC (the same value on x86-64 and arm64)
    private const int EEXIST = 17;
    private const int EINVAL = 22;
    private const int ENOSYS = 38;
    private const int EOPNOTSUPP = 95;

    [LibraryImport("libc", EntryPoint = "renameat2", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int RenameAt2(int oldDirectory, string oldPath, int newDirectory, string newPath, uint flags);

    [LibraryImport("libc", EntryPoint = "link", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Link(string oldPath, string newPath);

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int FSync(int fd);

    [LibraryImport("libc", EntryPoint = "close")]
    private static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "fstat", SetLastError = true)]
    private static unsafe partial int FStat(int fd, byte* buffer);

    /// <summary>
    /// Creates <paramref name="path"/> with the bytes <paramref name="write"/> puts in the (empty) temporary file.
    /// </summary>
    /// <exception cref="IOException"><paramref name="path"/> exists already, or the file system failed.</exception>
    public static void Create(string path, Action<SafeFileHandle> write)
    {
        var full = Path.GetFullPath(path);
        var directory = Path.GetDirectoryName(full) ?? "/";
        if (File.Exists(full) || Directory.Exists(full))
        {
            throw new IOException($"'{full}' already exists");
        }

        if (!Directory.Exists(directory))
        {
            throw new DirectoryNotFoundException($"the directory '{directory}' does not exist");
        }

        var temporary = Path.Combine(directory, $".{Path.GetFileName(full)}.{Guid.NewGuid().ToString("N")[..8]}.tmp");
        try
        {
            using (var handle = File.OpenHandle(temporary, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None))
            {
                write(handle);
                RandomAccess.FlushToDisk(handle);
            }

            Publish(temporary, full);
        }
        finally
        {
            // After a successful publish the temporary name is gone already (renamed, or unlinked after link).
            File.Delete(temporary);
        }

        SyncDirectory(directory);
    }

    /// <summary>Whether the two open files are the same file (the same device and inode, as fstat reports them).</summary>
    public static unsafe bool SameFile(SafeFileHandle first, SafeFileHandle second)
    {
        // st_dev and st_ino are the first two 64-bit fields of struct stat on x86-64 and on arm64 (asm-generic).
        var a = stackalloc byte[256];
        var b = stackalloc byte[256];
        var addedFirst = false;
        var addedSecond = false;
        try
        {
            first.DangerousAddRef(ref addedFirst);
            second.DangerousAddRef(ref addedSecond);
            if (FStat((int)first.DangerousGetHandle(), a) != 0 || FStat((int)second.DangerousGetHandle(), b) != 0)
            {
                throw new IOException($"fstat failed: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
            }

            return ((ulong*)a)[0] == ((ulong*)b)[0] && ((ulong*)a)[1] == ((ulong*)b)[1];
        }
        finally
        {
            if (addedFirst)
            {
                first.DangerousRelease();
            }

            if (addedSecond)
            {
                second.DangerousRelease();
            }
        }
    }

    private static void Publish(string temporary, string path)
    {
        if (RenameAt2(AtFdCwd, temporary, AtFdCwd, path, RenameNoReplace) == 0)
        {
            return;
        }

        var errno = Marshal.GetLastPInvokeError();
        if (errno is EINVAL or ENOSYS or EOPNOTSUPP)
        {
            // No RENAME_NOREPLACE here (older kernels, some file systems): link() refuses an existing name just as well.
            errno = Link(temporary, path) == 0 ? 0 : Marshal.GetLastPInvokeError();
        }

        if (errno == EEXIST)
        {
            throw new IOException($"'{path}' already exists (it appeared while it was being created)");
        }

        if (errno != 0)
        {
            throw new IOException($"cannot create '{path}': {Marshal.GetPInvokeErrorMessage(errno)}");
        }
    }

    private static void SyncDirectory(string directory)
    {
        var fd = Open(directory, OpenReadOnlyCloseOnExec);
        if (fd < 0)
        {
            throw new IOException($"cannot open the directory '{directory}' to sync it: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
        }

        try
        {
            if (FSync(fd) != 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                if (errno != EINVAL)
                {
                    // EINVAL: a file system that cannot sync directories (qemu ignores it too).
                    throw new IOException($"cannot sync the directory '{directory}': {Marshal.GetPInvokeErrorMessage(errno)}");
                }
            }
        }
        finally
        {
            _ = Close(fd);
        }
    }
}
