using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using Spindle.Protocol;
using Spindle.Storage.Native;

namespace Spindle.Storage.Layers;

/// <summary>
/// A dirty bitmap kept in a file of its own (docs/bitmaps.md): a 4 KiB header (<see cref="BitmapFileHeader"/>) then
/// the body, written page by page with pwrite and made durable with fdatasync. While a store is open it holds an
/// open file description lock (F_OFD_SETLK, write) on the file's first byte, so a second server or a management
/// command (<c>spindle bitmap</c>) finds it taken and refuses instead of racing the running server.
/// </summary>
public sealed partial class FileBitmapStore : DirtyBitmapStore
{
    private const short WriteLock = 1;

    private readonly SafeFileHandle _handle;
    private readonly BitmapFileHeader _header;

    private FileBitmapStore(string path, SafeFileHandle handle, BitmapFileHeader header)
    {
        Path = path;
        _handle = handle;
        _header = header;
    }

    /// <summary>The bitmap file.</summary>
    public string Path { get; }

    public override string Name => _header.Name;

    public override long Granularity => _header.Granularity;

    public override long ImageSize => _header.ImageSize;

    /// <summary>Whether a running server holds the file (known for a store opened read-only; false for a locked one).</summary>
    public bool InUse { get; private init; }

    /// <summary>
    /// Opens an existing bitmap file, and locks it unless only reading (<c>spindle bitmap list</c>, which may look at a
    /// bitmap a server holds: every acknowledged bit is on disk). A file that is not a well-formed bitmap, or one a
    /// running server holds, is refused with an <see cref="InvalidDataException"/> or <see cref="BitmapInUseException"/>.
    /// </summary>
    public static FileBitmapStore Open(string path, bool writable = true)
    {
        var handle = File.OpenHandle(path, FileMode.Open, writable ? FileAccess.ReadWrite : FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        try
        {
            var inUse = false;
            if (writable)
            {
                Lock(handle, path);
            }
            else
            {
                var type = WriteLock;
                inUse = LinuxFile.OfdLock(handle, test: true, ref type, 0, 1) == 0 && type != 2;
            }

            var page = new byte[BitmapFileHeader.Size];
            var read = RandomAccess.Read(handle, page, 0);
            if (!BitmapFileHeader.TryParse(page.AsSpan(0, read), out var header, out var problem))
            {
                throw new InvalidDataException($"bitmap file '{path}': {problem}");
            }

            var length = RandomAccess.GetLength(handle);
            if (length < BitmapFileHeader.Size + header!.BodyBytes)
            {
                throw new InvalidDataException($"bitmap file '{path}': {length} bytes, but its bitmap needs {BitmapFileHeader.Size + header.BodyBytes} (the file is truncated)");
            }

            return new FileBitmapStore(path, handle, header) { InUse = inUse };
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Creates a new, all-clean bitmap file at <paramref name="path"/> and opens it. The file is written under a
    /// temporary name, synced, renamed into place and the directory synced, so after a crash the bitmap either
    /// exists whole or not at all, and is never half-made.
    /// </summary>
    public static FileBitmapStore Create(string path, string name, long granularity, long imageSize)
    {
        if (!IsValidName(name))
        {
            throw new ArgumentException($"'{name}' is not a valid bitmap name (1 to 64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit)", nameof(name));
        }

        if (!IsValidGranularity(granularity))
        {
            throw new ArgumentOutOfRangeException(nameof(granularity), $"the granularity {granularity} is not a power of two from 512 bytes to 1 GiB");
        }

        var header = new BitmapFileHeader(name, granularity, imageSize);
        if (header.BodyBytes > DirtyBitmap.MaxBodyBytes)
        {
            throw new ArgumentOutOfRangeException(nameof(granularity), $"{header.BitCount} bits is more than 1 GiB of bitmap: choose a larger granularity");
        }

        var temporary = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        try
        {
            using (var handle = File.OpenHandle(temporary, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None))
            {
                var page = new byte[BitmapFileHeader.Size];
                header.Write(page);
                RandomAccess.Write(handle, page, 0);
                RandomAccess.SetLength(handle, BitmapFileHeader.Size + header.BodyBytes); // a sparse, all-clean body
                LinuxFile.DataSync(handle);
            }

            File.Move(temporary, path, overwrite: false);
            SyncDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
        }
        finally
        {
            File.Delete(temporary);
        }

        return Open(path);
    }

    public override void Load(Span<byte> destination)
    {
        var body = destination[..checked((int)_header.BodyBytes)];
        var read = 0;
        while (read < body.Length)
        {
            var count = RandomAccess.Read(_handle, body[read..], BitmapFileHeader.Size + read);
            if (count == 0)
            {
                throw new InvalidDataException($"bitmap file '{Path}' ended early");
            }

            read += count;
        }
    }

    public override void WritePage(long page, ReadOnlySpan<byte> data) =>
        RandomAccess.Write(_handle, data[..PageSize], BitmapFileHeader.Size + (page * PageSize));

    public override void Sync() => LinuxFile.DataSync(_handle);

    /// <summary>Clears every bit and syncs: the next backup starts from here.</summary>
    public void Clear()
    {
        var zeroes = new byte[Math.Min(_header.BodyBytes, 1 << 20)];
        for (long done = 0; done < _header.BodyBytes; done += zeroes.Length)
        {
            RandomAccess.Write(_handle, zeroes.AsSpan(0, (int)Math.Min(zeroes.Length, _header.BodyBytes - done)), BitmapFileHeader.Size + done);
        }

        Sync();
    }

    /// <summary>
    /// Removes a bitmap file unless a server holds it: locked first, so no server opens it meanwhile, and its header
    /// not read, so a damaged file can be removed too. The directory is synced.
    /// </summary>
    public static void Remove(string path)
    {
        using (var handle = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete))
        {
            Lock(handle, path);
            File.Delete(path);
        }

        SyncDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _handle.Dispose(); // closing the description releases its OFD lock
        }
    }

    private static void Lock(SafeFileHandle handle, string path)
    {
        var type = WriteLock;
        var errno = LinuxFile.OfdLock(handle, test: false, ref type, 0, 1);
        if (errno is Errno.EAGAIN or Errno.EACCES)
        {
            throw new BitmapInUseException($"bitmap file '{path}' is in use by a running spindle server (stop it first)");
        }

        if (errno != 0)
        {
            throw new IOException($"cannot lock bitmap file '{path}': {Marshal.GetPInvokeErrorMessage(errno)}");
        }
    }

    /// <summary>fsync of a directory, so a rename or unlink in it is durable.</summary>
    private static void SyncDirectory(string directory)
    {
        var fd = OpenDirectory(directory, 0x10000 /* O_RDONLY | O_DIRECTORY */);
        if (fd < 0)
        {
            throw new IOException($"cannot open directory '{directory}': {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
        }

        try
        {
            if (FSync(fd) != 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                throw new BlockDeviceException(Errno.ToNbdError(errno), $"fsync of directory '{directory}' failed: {Marshal.GetPInvokeErrorMessage(errno)}");
            }
        }
        finally
        {
            _ = Close(fd);
        }
    }

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int OpenDirectory(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int FSync(int fd);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int Close(int fd);
}

/// <summary>A bitmap file is held by a running server.</summary>
public sealed class BitmapInUseException : IOException
{
    public BitmapInUseException(string message)
        : base(message)
    {
    }

    public BitmapInUseException()
    {
    }

    public BitmapInUseException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}
