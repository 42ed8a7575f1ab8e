using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>
/// qemu's image locks (file-posix.c): an image open for writing here is refused by qemu-img and qemu-nbd, and one
/// they hold is refused here; readers share. Also the open-from-a-handle path with its backing-file hook.
/// </summary>
public sealed class LockTests
{
    private const long Size = 16L << 20;

    [Fact]
    public async Task A_writable_image_is_refused_to_qemu_and_to_a_second_instance_until_closed()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "disk.qcow2", "compat=1.1", Size);
        await using (var device = Qcow2Image.Open(image))
        {
            var info = await PeerTool.RunAsync("qemu-img", ["info", image]);
            Assert.NotEqual(0, info.ExitCode);
            Assert.Contains("Failed to get shared \"write\" lock", info.StandardError, StringComparison.Ordinal);
            await Qemu.Img("info", "-U", image);

            var second = Assert.Throws<IOException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
            Assert.Contains("is in use", second.Message, StringComparison.Ordinal);
            Assert.Throws<IOException>(() => Qcow2Image.Open(image));
        }

        await using (Qcow2Image.Open(image))
        {
            // Closed, then opened again: the locks went with the first instance.
        }

        await Qemu.Img("info", image);
    }

    [Fact]
    public async Task Readers_share_and_a_writer_held_by_qemu_nbd_is_respected()
    {
        using var directory = new TempDirectory();
        var image = await Qemu.Create(directory, "disk.qcow2", "compat=1.1", Size);
        await using (var first = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        await using (var second = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            await Qemu.Img("info", image);
            Assert.Throws<IOException>(() => Qcow2Image.Open(image));
        }

        await using (var qemu = await PeerServer.StartQemuNbdAsync(["-f", "qcow2", image]))
        {
            var refused = Assert.Throws<IOException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }));
            Assert.Contains("holds 'write' access", refused.Message, StringComparison.Ordinal);

            // Lock = false is qemu's file.locking=off: the caller vouches that nobody else writes.
            await using var unlocked = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true, Lock = false });
            Assert.Equal(Size, unlocked.Size);
        }
    }

    [Fact]
    public async Task Opened_from_a_handle_its_backing_files_go_through_the_hook()
    {
        using var directory = new TempDirectory();
        var basePath = directory.File("base.raw");
        await Qemu.Img("create", "-q", "-f", "raw", basePath, Size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        await Qemu.Io(basePath, "raw", "write -P 0x42 0 1M");
        var overlay = await Qemu.Create(directory, "overlay.qcow2", "compat=1.1,backing_file=base.raw,backing_fmt=raw", Size);

        var asked = new List<string>();
        var handle = File.OpenHandle(overlay, FileMode.Open, FileAccess.ReadWrite);
        await using (var device = Qcow2Image.Open(handle, overlay, new Qcow2OpenOptions
        {
            OpenBackingFile = path =>
            {
                asked.Add(path);
                return File.OpenHandle(path, FileMode.Open, FileAccess.Read);
            },
        }))
        {
            var buffer = new byte[4096];
            await device.ReadAsync(0, buffer, CancellationToken.None);
            Assert.All(buffer, b => Assert.Equal(0x42, b));
        }

        Assert.Equal([basePath], asked);

        // A hook that refuses makes the open fail cleanly, naming the backing file; the image is closed (unlocked).
        var refusedHandle = File.OpenHandle(overlay, FileMode.Open, FileAccess.ReadWrite);
        var error = Assert.Throws<UnauthorizedAccessException>(() => Qcow2Image.Open(refusedHandle, overlay, new Qcow2OpenOptions
        {
            OpenBackingFile = path => throw new UnauthorizedAccessException($"'{path}' is outside"),
        }));
        Assert.Contains("base.raw", error.Message, StringComparison.Ordinal);
        Assert.True(refusedHandle.IsClosed);
        await Qemu.Img("info", overlay);
    }
}
