using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests.Support;

/// <summary>
/// A device mounted on a fresh directory for one test. Disposal always leaves nothing behind: it unmounts (lazily
/// and then by aborting the connection if something still holds it, every wait bounded) and removes the directory.
/// </summary>
internal sealed class TestMount : IAsyncDisposable
{
    private readonly TempDirectory _directory;

    private TestMount(TempDirectory directory, string mountPoint, InstrumentedBlockDevice device, FuseMount mount)
    {
        _directory = directory;
        MountPoint = mountPoint;
        Device = device;
        Mount = mount;
    }

    public string MountPoint { get; }

    public InstrumentedBlockDevice Device { get; }

    public FuseMount Mount { get; }

    public string FilePath => Mount.FilePath;

    /// <summary>Mounts <paramref name="backend"/> behind an <see cref="InstrumentedBlockDevice"/> (set up by <paramref name="configure"/> before mounting).</summary>
    public static async Task<TestMount> CreateAsync(BlockDevice backend, FuseMountOptions? options = null, Action<InstrumentedBlockDevice>? configure = null)
    {
        var directory = new TempDirectory();
        var mountPoint = Path.Combine(directory.Path, "mnt");
        Directory.CreateDirectory(mountPoint);
        var device = new InstrumentedBlockDevice(backend);
        configure?.Invoke(device);
        try
        {
            var mount = await FuseMount.MountAsync(device, mountPoint, options, cancellationToken: TestContext.Current.CancellationToken);
            return new TestMount(directory, mountPoint, device, mount);
        }
        catch
        {
            directory.Dispose();
            throw;
        }
    }

    /// <summary>A memory device of <paramref name="size"/> bytes, mounted.</summary>
    public static Task<TestMount> MemoryAsync(long size = 64 << 20, FuseMountOptions? options = null, bool readOnly = false, Action<InstrumentedBlockDevice>? configure = null) =>
        CreateAsync(new MemoryBlockDevice(size, readOnly), options, configure);

    public async ValueTask DisposeAsync()
    {
        try
        {
            var dispose = Mount.DisposeAsync().AsTask();
            if (await Task.WhenAny(dispose, Task.Delay(TimeSpan.FromSeconds(30))) != dispose)
            {
                Mount.Abort();
            }
        }
        finally
        {
            if (MountTable.Find(MountPoint) is not null)
            {
                MountTable.Unmount(MountPoint, lazy: true);
            }

            await Device.Inner.DisposeAsync();
            _directory.Dispose();
        }
    }
}
