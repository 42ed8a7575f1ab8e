using Spindle.Storage;
using Spindle.Testing;

namespace Spindle.Fuse.Tests.Support;

/// <summary>The two real backends the file operations are proven on, and a way to read what each really holds.</summary>
internal static class Backends
{
    public const string Memory = "memory";
    public const string File = "file";

    public static BlockDevice Create(string kind, long size, TempDirectory scratch) => kind switch
    {
        Memory => new MemoryBlockDevice(size),
        File => FileBlockDevice.Open(scratch.CreateSparseFile("backing.img", size), readOnly: false),
        _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, null),
    };

    /// <summary>The bytes the backend holds at <paramref name="offset"/>, read around the mount (the backing file itself for a file backend).</summary>
    public static byte[] ReadBacking(BlockDevice device, long offset, int length)
    {
        var buffer = new byte[length];
        if (device is FileBlockDevice file)
        {
            using var handle = System.IO.File.OpenHandle(file.Path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            var done = 0;
            while (done < length)
            {
                var read = RandomAccess.Read(handle, buffer.AsSpan(done), offset + done);
                if (read == 0)
                {
                    break;
                }

                done += read;
            }

            return buffer;
        }

        device.ReadAsync(offset, buffer, CancellationToken.None).AsTask().GetAwaiter().GetResult();
        return buffer;
    }
}
