using System.Diagnostics;
using System.Security.Cryptography;
using Xunit;

namespace Spindle.Fuse.Tests.Support;

/// <summary>One file the workload wrote: its name, size, SHA-256, and how long its write plus fsync took.</summary>
internal sealed record WrittenFile(string Name, int Size, string Sha256, TimeSpan WriteAndFsync);

/// <summary>
/// The workload of the end-to-end tests: on a thread of its own (write and fsync block), files of random data and
/// varied sizes, each created, written, fsync'd, its SHA-256 and the time the write plus fsync took recorded, one
/// after the other until told to stop, until the byte budget or the file limit is reached, or until the first error,
/// which ends it and is kept for the test to report.
/// </summary>
internal sealed class FileWriter : IDisposable
{
    /// <summary>Sizes from one byte to 2 MiB, odd ones included (partial blocks, partial pages).</summary>
    private static readonly int[] Sizes = [1, 511, 4096, 4097, 12_345, 65_536, 65_537, 200_000, 524_288, (1 << 20) + 3, 2 << 20];

    private readonly string _directory;
    private readonly Random _random;
    private readonly long _byteBudget;
    private readonly int _maxFiles;
    private readonly List<WrittenFile> _files = [];
    private readonly Lock _lock = new();
    private readonly TaskCompletionSource _finished = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly CancellationTokenSource _stop = new();
    private int _completed;

    private FileWriter(string directory, int seed, long byteBudget, int maxFiles)
    {
        _directory = directory;
        _random = new Random(seed);
        _byteBudget = byteBudget;
        _maxFiles = maxFiles;
        Seed = seed;
    }

    public int Seed { get; }

    /// <summary>Files written and fsync'd so far.</summary>
    public int Completed => Volatile.Read(ref _completed);

    /// <summary>The first error the workload met (it stops there), or null.</summary>
    public Exception? Error { get; private set; }

    /// <summary>Why the workload stopped by itself ("byte budget", "file limit"), or null while it runs or when it was told to stop.</summary>
    public string? StoppedBecause { get; private set; }

    public IReadOnlyList<WrittenFile> Files
    {
        get
        {
            lock (_lock)
            {
                return [.. _files];
            }
        }
    }

    public long Bytes => Files.Sum(file => (long)file.Size);

    public TimeSpan LongestStall => Files.Count == 0 ? TimeSpan.Zero : Files.Max(file => file.WriteAndFsync);

    public TimeSpan Median
    {
        get
        {
            var sorted = Files.Select(file => file.WriteAndFsync).Order().ToList();
            return sorted.Count == 0 ? TimeSpan.Zero : sorted[sorted.Count / 2];
        }
    }

    /// <summary>Starts writing into <paramref name="directory"/> (created if missing).</summary>
    public static FileWriter Start(string directory, int seed, long byteBudget = 150L << 20, int maxFiles = 2000)
    {
        Directory.CreateDirectory(directory);
        var writer = new FileWriter(directory, seed, byteBudget, maxFiles);
        var thread = new Thread(writer.Run) { IsBackground = true, Name = "e2e file writer" };
        thread.Start();
        return writer;
    }

    /// <summary>
    /// Waits until at least <paramref name="minFiles"/> more files are written and fsync'd, and then for at least
    /// <paramref name="minTime"/> in all unless <paramref name="enoughFiles"/> more are done first (which keeps the
    /// bytes written bounded on a fast machine). Fails the test if the workload met an error, stopped, or took longer
    /// than <paramref name="bound"/>.
    /// </summary>
    public async Task WaitForProgressAsync(int minFiles, TimeSpan minTime, int enoughFiles, TimeSpan bound)
    {
        var start = Completed;
        var watch = Stopwatch.StartNew();
        while (Completed - start < minFiles || (watch.Elapsed < minTime && Completed - start < enoughFiles))
        {
            Assert.True(Error is null, $"the workload failed after {Completed} files: {Error}");
            Assert.False(_finished.Task.IsCompleted, $"the workload stopped ({StoppedBecause}) after {Completed} files");
            Assert.True(watch.Elapsed < bound, $"the workload wrote {Completed - start} files, not {minFiles}, within {bound.TotalSeconds} s");
            await Task.Delay(20, TestContext.Current.CancellationToken);
        }
    }

    /// <summary>Asks the workload to stop after the file it is writing and waits (bounded) for it.</summary>
    public async Task StopAsync(TimeSpan bound)
    {
        await _stop.CancelAsync();
        await _finished.Task.WaitAsync(bound, TestContext.Current.CancellationToken);
    }

    /// <summary>Asks the workload to stop without waiting (cleanup after a failure; a thread stuck in the kernel is left behind).</summary>
    public void Dispose() => _stop.Cancel();

    private void Run()
    {
        long bytes = 0;
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                if (Completed >= _maxFiles)
                {
                    StoppedBecause = "file limit";
                    return;
                }

                var size = Sizes[_random.Next(Sizes.Length)];
                if (bytes + size > _byteBudget)
                {
                    StoppedBecause = "byte budget";
                    return;
                }

                var data = new byte[size];
                _random.NextBytes(data);
                var name = $"f{Completed:D5}-{size}.bin";
                var watch = Stopwatch.StartNew();
                using (var stream = new FileStream(Path.Combine(_directory, name), FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 0))
                {
                    stream.Write(data);

                    // fsync(2): the file system sends its journal and the data down to the device, which flushes.
                    stream.Flush(flushToDisk: true);
                }

                var elapsed = watch.Elapsed;
                lock (_lock)
                {
                    _files.Add(new WrittenFile(name, size, Convert.ToHexString(SHA256.HashData(data)), elapsed));
                }

                bytes += size;
                Interlocked.Increment(ref _completed);
            }
        }
        catch (Exception exception)
        {
            Error = exception;
        }
        finally
        {
            _finished.TrySetResult();
        }
    }
}
