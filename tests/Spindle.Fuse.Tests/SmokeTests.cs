using Spindle.Storage;
using Xunit;

namespace Spindle.Fuse.Tests;

public sealed class SmokeTests
{
    [Fact]
    public async Task Smoke()
    {
        var dir = Directory.CreateTempSubdirectory("fuse-smoke").FullName;
        await using var device = new MemoryBlockDevice(16 << 20);
        await using (var mount = await FuseMount.MountAsync(device, dir, cancellationToken: TestContext.Current.CancellationToken))
        {
            var data = new byte[4096];
            new Random(1).NextBytes(data);
            using (var handle = File.OpenHandle(mount.FilePath, FileMode.Open, FileAccess.ReadWrite))
            {
                RandomAccess.Write(handle, data, 8192);
                var back = new byte[4096];
                Assert.Equal(4096, RandomAccess.Read(handle, back, 8192));
                Assert.Equal(data, back);
            }

            var fromDevice = new byte[4096];
            await device.ReadAsync(8192, fromDevice, TestContext.Current.CancellationToken);
            Assert.Equal(data, fromDevice);
            Assert.Equal(16 << 20, new FileInfo(mount.FilePath).Length);
        }

        Assert.Null(MountTable.Find(dir));
        Directory.Delete(dir);
    }
}
