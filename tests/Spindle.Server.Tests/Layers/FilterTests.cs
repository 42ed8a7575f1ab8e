using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Storage.Layers;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests.Layers;

/// <summary>The fault filters on their own, and filters stacked over per-connection overlays.</summary>
public sealed class FilterTests
{
    [Fact]
    public async Task Injected_errors_hit_only_the_chosen_commands_and_never_reach_the_device()
    {
        var inner = new MemoryBlockDevice(1024 * 1024);
        await using var device = new ErrorInjectionDevice(inner, new ErrorInjectionOptions { Probability = 0.5, Error = NbdError.NoSpace, Commands = FilterCommands.Write, Seed = 7 }, ownsInner: true);
        var failed = 0;
        for (var i = 0; i < 200; i++)
        {
            try
            {
                await device.WriteAsync(i * 4096L, new byte[] { 1 }, fua: false, CancellationToken.None);
            }
            catch (BlockDeviceException exception)
            {
                Assert.Equal(NbdError.NoSpace, exception.Error);
                failed++;
                var check = new byte[1];
                await inner.ReadAsync(i * 4096L, check, CancellationToken.None);
                Assert.Equal(0, check[0]);
            }

            await device.ReadAsync(i * 4096L, new byte[1], CancellationToken.None); // reads never fail
            await device.FlushAsync(CancellationToken.None);
        }

        Assert.InRange(failed, 50, 150);
        Assert.Throws<ArgumentOutOfRangeException>(() => new ErrorInjectionDevice(inner, new ErrorInjectionOptions { Probability = 1.5 }, ownsInner: false));
    }

    [Fact]
    public async Task Filters_and_the_log_stack_over_per_connection_overlays()
    {
        using var directory = new TempDirectory();
        var log = directory.File("requests.log");
        var baseDevice = new MemoryBlockDevice(64 * 1024, readOnly: true);
        BlockDevice stack = new PerConnectionCowDevice(baseDevice, directory.Path, ownsBase: true);
        stack = new DelayDevice(stack, TimeSpan.Zero, TimeSpan.FromMilliseconds(1), ownsInner: true);
        stack = new RateLimitDevice(stack, 1L << 30, burst: null, ownsInner: true);
        stack = new RequestLogDevice(stack, log, ownsInner: true);
        Assert.False(stack.Features.HasFlag(BlockDeviceFeatures.SharedCache));
        await using (stack)
        {
            await using var first = await stack.OpenConnectionAsync(CancellationToken.None);
            await using var second = await stack.OpenConnectionAsync(CancellationToken.None);
            await first.WriteAsync(0, new byte[] { 5 }, fua: false, CancellationToken.None);
            var check = new byte[1];
            await second.ReadAsync(0, check, CancellationToken.None);
            Assert.Equal(0, check[0]);
            await first.ReadAsync(0, check, CancellationToken.None);
            Assert.Equal(5, check[0]);
        }

        var lines = await File.ReadAllLinesAsync(log);
        Assert.Equal(3, lines.Length);
        Assert.Contains("conn=1 WRITE offset=0 length=1 result=OK", lines[0], StringComparison.Ordinal);
        Assert.Contains("conn=2 READ offset=0 length=1 result=OK", lines[1], StringComparison.Ordinal);
        Assert.Contains("conn=1 READ offset=0 length=1 result=OK", lines[2], StringComparison.Ordinal);
    }
}
