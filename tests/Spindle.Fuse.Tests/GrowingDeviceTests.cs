using Spindle.Fuse.Tests.Support;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>
/// A device that grows under a mount (an NBD export resized online, taken by the client after it reconnected): the
/// file grows with it, although the kernel had its size cached, and the new end can be written and read.
/// </summary>
public sealed class GrowingDeviceTests
{
    private const long Small = 1 << 20;
    private const long Large = 4 << 20;
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task The_file_follows_a_device_that_grew_and_its_new_end_is_usable()
    {
        var device = new ResizableMemoryDevice(Small, Large);
        await using var mount = await TestMount.CreateAsync(device);

        // stat caches the attributes in the kernel (for an hour): only the notification makes it ask again.
        Assert.Equal(Small, new FileInfo(mount.FilePath).Length);
        device.Resize(Large);

        var deadline = DateTime.UtcNow + Bound;
        for (var round = 0; new FileInfo(mount.FilePath).Length != Large; round++)
        {
            Assert.True(DateTime.UtcNow < deadline && round < 10_000, $"the file still has {new FileInfo(mount.FilePath).Length} bytes");
            await Task.Delay(50, TestContext.Current.CancellationToken);
        }

        var data = Patterns.Generate(Large - 8192, 8192, seed: 14);
        using (var file = PosixFile.Open(mount.FilePath, Posix.ORdWr))
        {
            file.WriteExactly(data, Large - 8192);
            Assert.Equal(data, file.ReadExactly(Large - 8192, data.Length));
        }

        var back = new byte[data.Length];
        await device.ReadAsync(Large - 8192, back, TestContext.Current.CancellationToken);
        Assert.Equal(data, back);
    }
}
