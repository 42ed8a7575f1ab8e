using Microsoft.Win32.SafeHandles;
using Spindle.Storage.Native;

namespace Spindle.Storage.Qcow2;

/// <summary>
/// qemu's image locking (block/file-posix.c, "image locking"), so that Spindle and qemu never both own an image's
/// metadata: two writers, or a writer and a reader, of one qcow2 file would each cache L2 tables and refcounts the
/// other changes underneath, and corrupt it.
/// </summary>
/// <remarks>
/// <para>Open file description locks (F_OFD_SETLK, shared read locks of one byte) on the image file, one byte per
/// permission: byte 100 + bit for each permission held, byte 200 + bit for each permission the holder does not let
/// others have. The permission bits are qemu's: 0 consistent read, 1 write, 2 write-unchanged, 3 resize. A qcow2
/// user, reading or writing, holds consistent read and denies others write and resize (its metadata must not change
/// underneath); a writer also holds write and resize. Before using the image the opener tests, with F_OFD_GETLK for
/// a write lock, that nobody else denies what it holds (bytes 200 + bit) or holds what it denies (bytes 100 + bit),
/// exactly as qemu does, so qemu-img, qemu-io and qemu-nbd refuse an image Spindle serves ("Failed to get shared
/// 'write' lock") and Spindle refuses one they have open, unless they were told to share (qemu-img -U).</para>
/// <para>The locks belong to the open file description: they vanish when the image is closed or the process dies
/// (kill -9 included), and a second open of the same file in the same process conflicts like any other user.</para>
/// </remarks>
internal static class ImageLock
{
    private const int PermissionBase = 100;
    private const int SharedBase = 200;
    private const int ConsistentRead = 0;
    private const int Write = 1;
    private const int Resize = 3;
    private const short ReadLock = 0; // F_RDLCK
    private const short WriteLock = 1; // F_WRLCK
    private const short Unlocked = 2; // F_UNLCK

    private static readonly string[] PermissionNames = ["consistent read", "write", "write unchanged", "resize"];

    /// <summary>
    /// Takes the locks of a qcow2 reader, or writer. Returns null when they are held, or a note when this file
    /// system has no OFD locks (the image is then used unlocked, as qemu's locking=auto does).
    /// </summary>
    /// <exception cref="IOException">Another process, or another open of this file, uses the image in a conflicting way.</exception>
    public static string? Acquire(SafeFileHandle handle, string path, bool writable)
    {
        int[] held = writable ? [ConsistentRead, Write, Resize] : [ConsistentRead];
        int[] denied = [Write, Resize];
        foreach (var bit in held)
        {
            if (Apply(handle, PermissionBase + bit, ReadLock) is { } errno)
            {
                return Unsupported(errno, path);
            }
        }

        foreach (var bit in denied)
        {
            if (Apply(handle, SharedBase + bit, ReadLock) is { } errno)
            {
                return Unsupported(errno, path);
            }
        }

        foreach (var bit in held)
        {
            if (IsLockedByOthers(handle, SharedBase + bit))
            {
                Release(handle);
                throw new IOException($"'{path}' is in use: another program (qemu, or another Spindle export of the same file) denies it '{PermissionNames[bit]}' access; stop it, or serve the image through that program");
            }
        }

        foreach (var bit in denied)
        {
            if (IsLockedByOthers(handle, PermissionBase + bit))
            {
                Release(handle);
                throw new IOException($"'{path}' is in use: another program (qemu, or another Spindle export of the same file) holds '{PermissionNames[bit]}' access to it; stop it, or serve the image through that program");
            }
        }

        return null;
    }

    private static string? Unsupported(int errno, string path)
    {
        const int ENOLCK = 37, EINVAL = 22, ENOSYS = 38, EOPNOTSUPP = 95, EAGAIN = 11, EACCES = 13;
        if (errno is EAGAIN or EACCES)
        {
            // Someone holds an exclusive lock on our byte: nothing in qemu's protocol does, but it is a conflict.
            throw new IOException($"'{path}' is locked by another program");
        }

        return errno is ENOLCK or EINVAL or ENOSYS or EOPNOTSUPP
            ? $"this file system does not support open file description locks (errno {errno}): the image is not protected from being opened by qemu at the same time"
            : throw new IOException($"locking '{path}' failed (errno {errno})");
    }

    /// <summary>Unlocks every byte of both ranges on this open file description (F_UNLCK), whoever else still shares it.</summary>
    public static void Release(SafeFileHandle handle)
    {
        var type = Unlocked;
        _ = LinuxFile.OfdLock(handle, test: false, ref type, PermissionBase, SharedBase - PermissionBase + 8);
    }

    private static int? Apply(SafeFileHandle handle, long offset, short type)
    {
        var errno = LinuxFile.OfdLock(handle, test: false, ref type, offset, 1);
        return errno == 0 ? null : errno;
    }

    private static bool IsLockedByOthers(SafeFileHandle handle, long offset)
    {
        var type = WriteLock;
        return LinuxFile.OfdLock(handle, test: true, ref type, offset, 1) == 0 && type != Unlocked;
    }
}
