using Spindle.Fuse.Tests.Support;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>
/// Many requests in flight: concurrent readers and writers each see exactly their own data, and a request the
/// device is slow to answer (asynchronously, or by blocking its thread) does not hold up the others.
/// </summary>
public sealed class ConcurrencyTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Concurrent_writers_and_readers_each_see_their_own_data(bool directIo)
    {
        const int Writers = 12;
        const int Readers = 6;
        const int Region = 2 << 20;
        const int ReadOnlyRegion = 4 << 20;
        await using var mount = await TestMount.MemoryAsync((long)Region * Writers + ReadOnlyRegion);
        var readOnlyStart = (long)Region * Writers;
        var fixedData = Patterns.Generate(readOnlyStart, ReadOnlyRegion, seed: 99);
        await mount.Device.Inner.WriteAsync(readOnlyStart, fixedData, fua: false, TestContext.Current.CancellationToken);

        var shadows = new byte[Writers][];
        var failures = new System.Collections.Concurrent.ConcurrentQueue<string>();
        var threads = new List<Thread>();
        for (var writer = 0; writer < Writers; writer++)
        {
            var index = writer;
            shadows[index] = new byte[Region];
            threads.Add(new Thread(() => RunWriter(mount.FilePath, index, (long)index * Region, shadows[index], directIo, failures)));
        }

        for (var reader = 0; reader < Readers; reader++)
        {
            var seed = reader;
            threads.Add(new Thread(() => RunReader(mount.FilePath, readOnlyStart, fixedData, seed, failures)));
        }

        threads.ForEach(thread => thread.Start());
        foreach (var thread in threads)
        {
            Assert.True(thread.Join(Bound), "a reader or writer did not finish");
        }

        Assert.Empty(failures);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdOnly);
        for (var writer = 0; writer < Writers; writer++)
        {
            Assert.Equal(shadows[writer], file.ReadExactly((long)writer * Region, Region));
            Assert.Equal(shadows[writer], Backends.ReadBacking(mount.Device.Inner, (long)writer * Region, Region));
        }

        Assert.True(mount.Device.Count("write") >= Writers * 40);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_slow_read_does_not_hold_up_other_requests(bool blockingBackend)
    {
        await using var mount = await TestMount.MemoryAsync(16 << 20, configure: device =>
        {
            device.HeldFrom = 0;
            device.HeldTo = 4096;
            device.HoldByBlocking = blockingBackend;
        });
        var expected = Patterns.Generate(0, 4096, seed: 6);
        await mount.Device.Inner.WriteAsync(0, expected, fua: false, TestContext.Current.CancellationToken);

        // Several reads stuck in the device at once, more than the threads that wait for requests when idle.
        const int Stuck = 5;
        var held = Enumerable.Range(0, Stuck).Select(_ => RunOnThread(() =>
        {
            using var file = PosixFile.Open(mount.FilePath, Posix.ORdOnly | Posix.ODirect);
            var buffer = Posix.AlignedBuffer(4096);
            Assert.Equal(4096, Posix.PRead(file.Fd, buffer, 0));
            return buffer;
        })).ToList();
        await WaitUntilAsync(() => mount.Device.HeldReads == Stuck);

        // Meanwhile other reads and writes go through.
        var others = RunOnThread(() =>
        {
            using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
            for (var i = 0; i < 50; i++)
            {
                var offset = (1L << 20) + (i * 8192);
                file.WriteExactly(Patterns.Generate(offset, 8192, seed: i), offset);
                Assert.Equal(Patterns.Generate(offset, 8192, seed: i), file.ReadExactly(offset, 8192));
            }

            return Array.Empty<byte>();
        });
        await others.WaitAsync(Bound, TestContext.Current.CancellationToken);
        Assert.All(held, task => Assert.False(task.IsCompleted));

        mount.Device.Release();
        foreach (var task in held)
        {
            Assert.Equal(expected, await task.WaitAsync(Bound, TestContext.Current.CancellationToken));
        }

        Assert.InRange(mount.Mount.ThreadCount, 1, new FuseMountOptions().MaxThreads);
    }

    [Fact]
    public async Task Threads_are_bounded_and_blocked_requests_queue_in_the_kernel()
    {
        var options = new FuseMountOptions { MinThreads = 1, MaxThreads = 3, MaxInFlight = 8 };
        await using var mount = await TestMount.MemoryAsync(16 << 20, options, configure: device =>
        {
            device.HeldFrom = 0;
            device.HeldTo = 1 << 20;
            device.HoldByBlocking = true;
        });

        var reads = Enumerable.Range(0, 6).Select(i => RunOnThread(() =>
        {
            using var file = PosixFile.Open(mount.FilePath, Posix.ORdOnly | Posix.ODirect);
            var buffer = Posix.AlignedBuffer(4096);
            Assert.Equal(4096, Posix.PRead(file.Fd, buffer, i * 4096L));
            return buffer;
        })).ToList();

        // Every thread ends up blocked in the device; the other requests wait in the kernel, none is lost.
        await WaitUntilAsync(() => mount.Device.HeldReads == 3);
        Assert.Equal(3, mount.Mount.ThreadCount);

        mount.Device.Release();
        foreach (var read in reads)
        {
            Assert.Equal(new byte[4096], await read.WaitAsync(Bound, TestContext.Current.CancellationToken));
        }

        Assert.Equal(6, mount.Device.Calls.Count(c => c.Operation == "read" && c.Offset < 1 << 20));
    }

    private static void RunWriter(string path, int seed, long start, byte[] shadow, bool directIo, System.Collections.Concurrent.ConcurrentQueue<string> failures)
    {
        try
        {
            var random = new Random(seed);
            using var file = PosixFile.Open(path, Posix.ORdWr | (directIo ? Posix.ODirect : 0));
            var buffer = Posix.AlignedBuffer(1 << 20);
            for (var i = 0; i < 60; i++)
            {
                // O_DIRECT needs 512-byte alignment; buffered writes try odd sizes and offsets too.
                var unit = directIo ? 512 : 1;
                var length = random.Next(1, (directIo ? 2048 : 1 << 20) / unit + 1) * unit;
                length = Math.Min(length, 1 << 20);
                var offset = random.Next(0, (shadow.Length - length) / unit + 1) * unit;
                random.NextBytes(buffer.AsSpan(0, length));
                var written = Posix.PWrite(file.Fd, buffer.AsSpan(0, length), start + offset);
                if (written != length)
                {
                    failures.Enqueue($"writer {seed}: pwrite returned {written}");
                    return;
                }

                buffer.AsSpan(0, length).CopyTo(shadow.AsSpan(offset));
                if (i % 10 == 0)
                {
                    var check = Posix.AlignedBuffer(length);
                    if (Posix.PRead(file.Fd, check, start + offset) != length || !check.AsSpan().SequenceEqual(shadow.AsSpan(offset, length)))
                    {
                        failures.Enqueue($"writer {seed}: read back differs at {start + offset}");
                    }
                }
            }
        }
        catch (Exception exception)
        {
            failures.Enqueue($"writer {seed}: {exception}");
        }
    }

    private static void RunReader(string path, long start, byte[] expected, int seed, System.Collections.Concurrent.ConcurrentQueue<string> failures)
    {
        try
        {
            var random = new Random(1000 + seed);
            using var file = PosixFile.Open(path, Posix.ORdOnly);
            for (var i = 0; i < 200; i++)
            {
                var length = random.Next(1, 256 * 1024);
                var offset = random.Next(0, expected.Length - length);
                var buffer = new byte[length];
                if (Posix.PRead(file.Fd, buffer, start + offset) != length || !buffer.AsSpan().SequenceEqual(expected.AsSpan(offset, length)))
                {
                    failures.Enqueue($"reader {seed}: wrong data at {start + offset} (+{length})");
                    return;
                }
            }
        }
        catch (Exception exception)
        {
            failures.Enqueue($"reader {seed}: {exception}");
        }
    }

    /// <summary>Blocking file I/O on a thread of its own, so the thread pool (which completes asynchronous device calls) stays free.</summary>
    private static Task<byte[]> RunOnThread(Func<byte[]> work) =>
        Task.Factory.StartNew(work, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    private static async Task WaitUntilAsync(Func<bool> condition)
    {
        var watch = System.Diagnostics.Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(watch.Elapsed < Bound, "the condition was not reached in time");
            await Task.Delay(10, TestContext.Current.CancellationToken);
        }
    }
}
