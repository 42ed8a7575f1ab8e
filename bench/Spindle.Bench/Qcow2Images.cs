using System.Globalization;

namespace Spindle.Bench;

/// <summary>
/// The images of the qcow2 rows (issue 13): qcow2 conversions of the benchmark's raw image with 64 KiB clusters
/// (qemu's default), one fully allocated and one half allocated, each served by every server from a copy of its own
/// (<see cref="ImageSpec.CopyPerServer"/>) and checked with <c>qemu-img check</c> after every run that wrote.
/// </summary>
internal static class Qcow2Images
{
    /// <summary>How long qemu-img may take to convert or check a 1 GiB image on a busy machine.</summary>
    private static readonly TimeSpan QemuImgTimeout = TimeSpan.FromMinutes(5);

    /// <summary>Every cluster allocated: random data converted as it is.</summary>
    public static readonly ImageSpec Full = new("qcow2", (raw, work) => ConvertAsync(raw, Path.Combine(work, "image.qcow2")))
    {
        CopyPerServer = true,
        CheckAsync = CheckAsync,
    };

    /// <summary>
    /// Every other MiB allocated: the raw image with its odd MiBs punched out (a sparse file), converted, so qemu-img
    /// leaves those clusters unallocated. Writes there allocate; reads there meet holes.
    /// </summary>
    public static readonly ImageSpec Half = new("qcow2-half", async (raw, work) =>
    {
        var sparse = Path.Combine(work, "image-half.raw");
        await CopyEveryOtherMebibyteAsync(raw, sparse);
        try
        {
            return await ConvertAsync(sparse, Path.Combine(work, "image-half.qcow2"));
        }
        finally
        {
            File.Delete(sparse);
        }
    })
    {
        CopyPerServer = true,
        CheckAsync = CheckAsync,
    };

    private static async Task<string> ConvertAsync(string raw, string qcow2)
    {
        var result = await Processes.RunAsync("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", raw, qcow2], QemuImgTimeout);
        return result.ExitCode == 0 ? qcow2 : throw new InvalidOperationException($"qemu-img convert to {qcow2} failed: {result.Error}");
    }

    /// <summary>A sparse file the raw image's size holding its even MiBs (0, 2, 4, ...) and holes between.</summary>
    private static async Task CopyEveryOtherMebibyteAsync(string raw, string sparse)
    {
        var buffer = new byte[1 << 20];
        await using var source = new FileStream(raw, FileMode.Open, FileAccess.Read);
        await using var target = new FileStream(sparse, FileMode.Create, FileAccess.Write);
        target.SetLength(source.Length);
        for (var offset = 0L; offset < source.Length; offset += 2L * buffer.Length)
        {
            source.Position = offset;
            var read = await source.ReadAtLeastAsync(buffer, buffer.Length, throwOnEndOfStream: false);
            target.Position = offset;
            await target.WriteAsync(buffer.AsMemory(0, read));
        }
    }

    /// <summary>
    /// <c>qemu-img check</c> of a copy after its server was stopped (SIGKILL, as every server in the benchmark):
    /// exit 0 is clean, 3 leaked clusters only (what a kill before a flush may leave, repaired by
    /// <c>qemu-img check -r leaks</c>); anything else (2: corruption) fails the benchmark, as it would mean a server
    /// damaged the image.
    /// </summary>
    private static async Task<string> CheckAsync(string image)
    {
        var result = await Processes.RunAsync("qemu-img", ["check", "-f", "qcow2", image], QemuImgTimeout);
        return result.ExitCode switch
        {
            0 => "qemu-img check: clean",
            3 => "qemu-img check: leaked clusters only (" + FirstLine(result.Output, "leaked") + ")",
            _ => throw new InvalidOperationException(string.Create(CultureInfo.InvariantCulture, $"qemu-img check {image} failed ({result.ExitCode}): {result.Output}{result.Error}")),
        };
    }

    private static string FirstLine(string text, string containing) =>
        text.Split('\n').FirstOrDefault(l => l.Contains(containing, StringComparison.Ordinal))?.Trim() ?? "?";
}
