using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>Spindle's server driven by real qemu-img and qemu-io, over TCP and Unix sockets.</summary>
public sealed class QemuTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Qemu_img_info_reads_the_size(bool unix)
    {
        await using var server = await InteropServer.StartAsync();
        var uri = unix ? server.UnixUri() : server.Uri();
        var result = await PeerTool.RunCheckedAsync("qemu-img", ["info", "--output=json", uri]);
        using var json = System.Text.Json.JsonDocument.Parse(result.StandardOutput);
        Assert.Equal(InteropServer.Size, json.RootElement.GetProperty("virtual-size").GetInt64());
        Assert.Equal("raw", json.RootElement.GetProperty("format").GetString());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Qemu_img_convert_out_of_spindle_is_byte_identical(bool unix)
    {
        await using var server = await InteropServer.StartAsync();
        var output = server.Directory.File("out.img");
        await PeerTool.RunCheckedAsync("qemu-img", ["convert", "-f", "raw", "-O", "raw", unix ? server.UnixUri() : server.Uri(), output]);
        Assert.Equal(await File.ReadAllBytesAsync(server.ImagePath), await File.ReadAllBytesAsync(output));
        await PeerTool.RunCheckedAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", server.ImagePath, server.Uri()]);
    }

    [Fact]
    public async Task Qemu_img_convert_into_spindle_then_compare()
    {
        await using var server = await InteropServer.StartAsync();
        var source = server.Directory.File("source.img");
        var bytes = Patterns.Random((int)InteropServer.Size, seed: 42);
        Array.Clear(bytes, 8 * 1024 * 1024, 16 * 1024 * 1024); // a zero run for qemu to skip
        await File.WriteAllBytesAsync(source, bytes);
        await PeerTool.RunCheckedAsync("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, server.Uri("mem")]);
        var compare = await PeerTool.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, server.Uri("mem")]);
        Assert.True(compare.ExitCode == 0, compare.ToString());
        Assert.Contains("Images are identical", compare.StandardOutput, StringComparison.Ordinal);

        var check = new byte[bytes.Length];
        await server.Memory.ReadAsync(0, check, CancellationToken.None);
        Assert.Equal(bytes, check);
    }

    [Fact]
    public async Task Qemu_img_compare_notices_a_difference()
    {
        await using var server = await InteropServer.StartAsync();
        var other = server.Directory.File("other.img");
        File.Copy(server.ImagePath, other);
        await using (var stream = new FileStream(other, FileMode.Open, FileAccess.Write))
        {
            stream.Position = 5_000_000;
            stream.WriteByte(1);
        }

        var compare = await PeerTool.RunAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", other, server.Uri()]);
        Assert.Equal(1, compare.ExitCode);
        // qemu-img reports the first differing 512-byte sector.
        Assert.Contains("Content mismatch at offset 4999680", compare.StandardOutput, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Qemu_io_patterns_discard_and_write_zeroes(bool unix)
    {
        await using var server = await InteropServer.StartAsync();
        var uri = unix ? server.UnixUri("mem") : server.Uri("mem");
        var result = await PeerTool.RunCheckedAsync("qemu-io", [
            "-f", "raw",
            "-c", "write -P 0xab 0 1M",
            "-c", "write -P 0xcd -f 1M 64k",
            "-c", "aio_write -P 0x11 2M 512k",
            "-c", "aio_write -P 0x22 3M 512k",
            "-c", "aio_flush",
            "-c", "read -P 0xab 0 1M",
            "-c", "read -P 0xcd 1M 64k",
            "-c", "read -P 0x11 2M 512k",
            "-c", "read -P 0x22 3M 512k",
            "-c", "write -z 256k 256k",
            "-c", "read -P 0 256k 256k",
            "-c", "write -z -u 2M 128k",
            "-c", "read -P 0 2M 128k",
            "-c", "read -P 0x11 2176k 384k",
            "-c", "discard 3M 512k",
            "-c", "write -P 0x33 5M 4k",
            "-c", "flush",
            "-c", "read -P 0x33 5M 4k",
            uri,
        ]);
        Assert.DoesNotContain("Pattern verification failed", result.StandardOutput + result.StandardError, StringComparison.Ordinal);
        Assert.DoesNotContain("failed", result.StandardError, StringComparison.OrdinalIgnoreCase);

        var check = new byte[6 * 1024 * 1024];
        await server.Memory.ReadAsync(0, check, CancellationToken.None);
        Assert.All(check[..(256 * 1024)], b => Assert.Equal(0xab, b));
        Assert.All(check[(256 * 1024)..(512 * 1024)], b => Assert.Equal(0, b));
        Assert.All(check[(1024 * 1024)..(1088 * 1024)], b => Assert.Equal(0xcd, b));
        Assert.All(check[(5 * 1024 * 1024)..(5 * 1024 * 1024 + 4096)], b => Assert.Equal(0x33, b));
    }

    [Fact]
    public async Task Qemu_io_cannot_write_a_read_only_export()
    {
        await using var server = await InteropServer.StartAsync();
        var result = await PeerTool.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 1 0 4k", server.Uri("ro")]);
        Assert.Contains("Permission denied", result.StandardOutput + result.StandardError, StringComparison.Ordinal);
        Assert.Equal(Patterns.Generate(1024 * 1024, 16), (await File.ReadAllBytesAsync(server.ImagePath))[(1024 * 1024)..(1024 * 1024 + 16)]);
    }
}
