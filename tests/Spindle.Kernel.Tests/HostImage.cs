using System.Globalization;
using System.Security.Cryptography;
using Spindle.Testing;
using Xunit;

namespace Spindle.Kernel.Tests;

/// <summary>Checks on the server's backing file, made on the host once the server has closed it.</summary>
internal static class HostImage
{
    public const long MiB = 1024 * 1024;

    public static string Sha256(ReadOnlySpan<byte> data) => Convert.ToHexStringLower(SHA256.HashData(data));

    public static async Task<string> Sha256Async(string path)
    {
        await using var stream = File.OpenRead(path);
        return Convert.ToHexStringLower(await SHA256.HashDataAsync(stream));
    }

    public static async Task<byte[]> ReadAsync(string path, long offset, int length)
    {
        var data = new byte[length];
        using var handle = File.OpenHandle(path);
        var done = 0;
        while (done < length)
        {
            var read = await RandomAccess.ReadAsync(handle, data.AsMemory(done), offset + done);
            Assert.True(read > 0, $"{path} ends before {offset + length}");
            done += read;
        }

        return data;
    }

    /// <summary>The ranges of <paramref name="path"/> that hold data, as SEEK_DATA / SEEK_HOLE report them.</summary>
    /// <remarks>Asked of python's os.lseek, independently of Spindle's own use of the same calls.</remarks>
    public static async Task<IReadOnlyList<(long Start, long End)>> DataExtentsAsync(string path)
    {
        const string script = """
            import os, sys
            fd = os.open(sys.argv[1], os.O_RDONLY)
            size = os.fstat(fd).st_size
            position = 0
            while position < size:
                try:
                    data = os.lseek(fd, position, os.SEEK_DATA)
                except OSError:
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                print(data, hole)
                position = hole
            """;
        var result = await PeerTool.RunPythonAsync(script, [path]);
        Assert.True(result.ExitCode == 0, result.ToString());
        return [.. result.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(line => line.Split(' '))
            .Select(parts => (long.Parse(parts[0], CultureInfo.InvariantCulture), long.Parse(parts[1], CultureInfo.InvariantCulture)))];
    }

    /// <summary>Fails if any data extent of <paramref name="path"/> overlaps [start, end).</summary>
    public static async Task AssertHoleAsync(string path, long start, long end)
    {
        var extents = await DataExtentsAsync(path);
        var overlapping = extents.Where(e => e.Start < end && start < e.End).ToList();
        Assert.True(overlapping.Count == 0, $"{path} holds data in [{start}, {end}): {string.Join(", ", overlapping)}");
    }
}
