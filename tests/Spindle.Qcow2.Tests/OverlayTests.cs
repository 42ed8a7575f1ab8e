using System.Globalization;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>
/// Persistent overlays (<see cref="Qcow2Overlay"/>): created as qemu-img would create them, reopened with their
/// writes, and refused when the file is not an overlay of the base asked for.
/// </summary>
public sealed class OverlayTests
{
    private const long BaseSize = 8L << 20;

    [Fact]
    public async Task An_overlay_is_created_once_and_keeps_its_writes_across_opens()
    {
        using var directory = new TempDirectory();
        var basePath = await CreateBase(directory, "base.img");
        var before = await File.ReadAllBytesAsync(basePath);
        var overlay = directory.File("overlay.qcow2");

        await using (var image = Qcow2Overlay.OpenOrCreate(overlay, basePath, null, out var created))
        {
            Assert.True(created);
            Assert.Equal(BaseSize, image.Size);
            Assert.Equal("base.img", image.BackingFile); // relative to the overlay's directory, as qemu stores it
            Assert.Equal("raw", image.BackingFormat);
            await image.WriteAsync(4096, Enumerable.Repeat((byte)0xe1, 8192).ToArray(), fua: false, CancellationToken.None);
        }

        await using (var image = Qcow2Overlay.OpenOrCreate(overlay, basePath, new Qcow2OverlayOptions { BaseFormat = "raw" }, out var created))
        {
            Assert.False(created);
            var buffer = new byte[3 * 4096];
            await image.ReadAsync(0, buffer, CancellationToken.None);
            Assert.All(buffer.AsSpan(0, 4096).ToArray(), b => Assert.Equal(0xb1, b));
            Assert.All(buffer.AsSpan(4096).ToArray(), b => Assert.Equal(0xe1, b));
        }

        await using (var image = Qcow2Overlay.OpenOrCreate(overlay, basePath, new Qcow2OverlayOptions { ReadOnly = true }, out _))
        {
            Assert.True(image.IsReadOnly);
        }

        await Qemu.Io(overlay, "qcow2", "read -P 0xb1 0 4k", "read -P 0xe1 4k 8k", "read -P 0xb1 12k 1012k");
        await Qemu.AssertConsistent(overlay, allowLeaks: false);
        Assert.Equal(before, await File.ReadAllBytesAsync(basePath));
    }

    [Fact]
    public async Task A_base_outside_the_overlay_directory_is_recorded_by_its_absolute_path()
    {
        using var directory = new TempDirectory();
        var basePath = await CreateBase(directory, "base.img");
        var overlay = Path.Combine(Directory.CreateDirectory(directory.File("overlays")).FullName, "a.qcow2");
        await using (var image = Qcow2Overlay.OpenOrCreate(overlay, basePath, null, out _))
        {
            Assert.Equal(basePath, image.BackingFile);
        }

        Assert.Equal("sub/b.img", Qcow2Overlay.BackingNameFor("/x/o.qcow2", "/x/sub/b.img"));
        Assert.Equal("/y/b.img", Qcow2Overlay.BackingNameFor("/x/o.qcow2", "/y/b.img"));
        using var info = await Qemu.Info(overlay);
        Assert.Equal(basePath, info.RootElement.GetProperty("full-backing-filename").GetString());
    }

    [Fact]
    public async Task Files_that_are_not_an_overlay_of_this_base_are_refused_and_left_alone()
    {
        using var directory = new TempDirectory();
        var basePath = await CreateBase(directory, "base.img");
        var other = await CreateBase(directory, "other.img");

        // An overlay of another image.
        var foreign = directory.File("foreign.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-b", "other.img", "-F", "raw", foreign);
        var message = Assert.Throws<Qcow2FormatException>(() => Qcow2Overlay.OpenOrCreate(foreign, basePath, null, out _)).Message;
        Assert.Contains("not of", message, StringComparison.Ordinal);

        // The same base under another name (a symbolic link) is the same file: accepted.
        var link = directory.File("link.img");
        File.CreateSymbolicLink(link, other);
        await using (Qcow2Overlay.OpenOrCreate(foreign, link, null, out var created))
        {
            Assert.False(created);
        }

        // A raw file, a qcow2 image without a backing file, the base itself, a format mismatch, a dangling backing file.
        var raw = directory.File("data.img");
        await File.WriteAllBytesAsync(raw, new byte[65536]);
        Assert.Contains("not a qcow2 image", Assert.Throws<Qcow2FormatException>(() => Qcow2Overlay.OpenOrCreate(raw, basePath, null, out _)).Message, StringComparison.Ordinal);
        var standalone = directory.File("standalone.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", standalone, "1M");
        Assert.Contains("without a backing file", Assert.Throws<Qcow2FormatException>(() => Qcow2Overlay.OpenOrCreate(standalone, basePath, null, out _)).Message, StringComparison.Ordinal);
        Assert.Contains("same file", Assert.Throws<Qcow2FormatException>(() => Qcow2Overlay.OpenOrCreate(basePath, basePath, null, out _)).Message, StringComparison.Ordinal);
        var good = directory.File("good.qcow2");
        await using (Qcow2Overlay.OpenOrCreate(good, basePath, null, out _))
        {
        }

        Assert.Contains("not as qcow2", Assert.Throws<Qcow2FormatException>(() => Qcow2Overlay.OpenOrCreate(good, basePath, new Qcow2OverlayOptions { BaseFormat = "qcow2" }, out _)).Message, StringComparison.Ordinal);
        var dangling = directory.File("dangling.qcow2");
        await Qemu.Img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.img", "-F", "raw", dangling, "8M");
        Assert.Contains("does not exist", Assert.Throws<Qcow2FormatException>(() => Qcow2Overlay.OpenOrCreate(dangling, basePath, null, out _)).Message, StringComparison.Ordinal);

        // A damaged header (the magic, then garbage) is refused as bad input, and left as it was.
        var damaged = directory.File("damaged.qcow2");
        var garbage = new byte[4096];
        new Random(17).NextBytes(garbage);
        new byte[] { 0x51, 0x46, 0x49, 0xfb }.CopyTo(garbage, 0); // "QFI\xfb"
        await File.WriteAllBytesAsync(damaged, garbage);
        Assert.Throws<Qcow2FormatException>(() => Qcow2Overlay.OpenOrCreate(damaged, basePath, null, out _));
        Assert.Equal(garbage, await File.ReadAllBytesAsync(damaged));

        // A read-only overlay is never created.
        Assert.Throws<FileNotFoundException>(() => Qcow2Overlay.OpenOrCreate(directory.File("new.qcow2"), basePath, new Qcow2OverlayOptions { ReadOnly = true }, out _));
        Assert.False(File.Exists(directory.File("new.qcow2")));

        Assert.Equal(65536, new FileInfo(raw).Length);
        Assert.Equal(new byte[65536], await File.ReadAllBytesAsync(raw));
    }

    private static async Task<string> CreateBase(TempDirectory directory, string name)
    {
        var path = directory.File(name);
        await Qemu.Img("create", "-q", "-f", "raw", path, BaseSize.ToString(CultureInfo.InvariantCulture));
        await Qemu.Io(path, "raw", "write -P 0xb1 0 1M");
        return path;
    }
}
