using System.Security.Cryptography;
using Spindle.Fuse.Tests.Support;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>Reading and writing the mounted file, checked against what the memory and file backends really hold.</summary>
public sealed class FileOperationTests
{
    private const long Size = 64L << 20;

    public static TheoryData<string> BackendKinds => [Backends.Memory, Backends.File];

    [Theory]
    [MemberData(nameof(BackendKinds))]
    public async Task The_mount_holds_one_regular_file_of_the_device_size(string kind)
    {
        using var scratch = new TempDirectory();
        await using var mount = await TestMount.CreateAsync(Backends.Create(kind, Size, scratch));

        Assert.Equal(["disk"], Directory.GetFileSystemEntries(mount.MountPoint).Select(Path.GetFileName));
        var info = new FileInfo(mount.FilePath);
        Assert.Equal(Size, info.Length);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, info.UnixFileMode);
        Assert.False(mount.Mount.ReadOnly);
    }

    [Theory]
    [MemberData(nameof(BackendKinds))]
    public async Task Writes_reach_the_backend_and_read_back(string kind)
    {
        using var scratch = new TempDirectory();
        await using var mount = await TestMount.CreateAsync(Backends.Create(kind, Size, scratch));

        // Aligned, unaligned, the last block, and one larger than a single FUSE request (1 MiB).
        (long Offset, int Length)[] pieces = [(0, 4096), ((1 << 20) + 123, 10_000), (Size - 4096, 4096), (8 << 20, 3 << 20)];
        using (var file = PosixFile.Open(mount.FilePath, Posix.ORdWr))
        {
            foreach (var (offset, length) in pieces)
            {
                file.WriteExactly(Patterns.Generate(offset, length, seed: 7), offset);
            }

            foreach (var (offset, length) in pieces)
            {
                Assert.Equal(Patterns.Generate(offset, length, seed: 7), file.ReadExactly(offset, length));
            }
        }

        foreach (var (offset, length) in pieces)
        {
            Assert.Equal(Patterns.Generate(offset, length, seed: 7), Backends.ReadBacking(mount.Device.Inner, offset, length));
        }

        // Nothing else was touched: the byte before the unaligned piece is still zero.
        Assert.Equal(new byte[1], Backends.ReadBacking(mount.Device.Inner, (1 << 20) + 122, 1));
    }

    [Theory]
    [MemberData(nameof(BackendKinds))]
    public async Task What_the_backend_holds_is_what_the_file_reads(string kind)
    {
        using var scratch = new TempDirectory();
        var backend = Backends.Create(kind, Size, scratch);
        var data = Patterns.Generate(5 << 20, 2 << 20, seed: 3);
        await backend.WriteAsync(5 << 20, data, fua: false, TestContext.Current.CancellationToken);
        await using var mount = await TestMount.CreateAsync(backend);

        using var file = PosixFile.Open(mount.FilePath, Posix.ORdOnly);
        Assert.Equal(data, file.ReadExactly(5 << 20, 2 << 20));
        Assert.Equal(new byte[4096], file.ReadExactly(0, 4096));
    }

    [Fact]
    public async Task Direct_io_with_aligned_buffers_works()
    {
        await using var mount = await TestMount.MemoryAsync();
        var data = Posix.AlignedBuffer(1 << 20);
        Patterns.Fill(data, 1 << 20, seed: 11);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr | Posix.ODirect);
        file.WriteExactly(data, 1 << 20);
        var back = Posix.AlignedBuffer(1 << 20);
        Assert.Equal(1 << 20, Posix.PRead(file.Fd, back, 1 << 20));
        Assert.Equal(data, back);
        Assert.Equal(data, Backends.ReadBacking(mount.Device.Inner, 1 << 20, 1 << 20));
    }

    [Fact]
    public async Task A_large_sequential_copy_matches_byte_for_byte()
    {
        await using var mount = await TestMount.MemoryAsync(48L << 20);
        var expected = Patterns.Random(40 << 20, seed: 5);
        await using (var stream = new FileStream(mount.FilePath, FileMode.Open, FileAccess.Write, FileShare.ReadWrite, bufferSize: 0))
        {
            for (var offset = 0; offset < expected.Length; offset += 1 << 20)
            {
                await stream.WriteAsync(expected.AsMemory(offset, 1 << 20), TestContext.Current.CancellationToken);
            }
        }

        byte[] actual;
        await using (var stream = new FileStream(mount.FilePath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, bufferSize: 0))
        {
            actual = new byte[expected.Length];
            await stream.ReadExactlyAsync(actual, TestContext.Current.CancellationToken);
        }

        Assert.Equal(SHA256.HashData(expected), SHA256.HashData(actual));
        Assert.Equal(SHA256.HashData(expected), SHA256.HashData(Backends.ReadBacking(mount.Device.Inner, 0, expected.Length)));
    }

    [Fact]
    public async Task Reads_at_the_end_return_nothing_and_across_it_are_short()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdOnly);
        var buffer = new byte[8192];
        Assert.Equal(0, Posix.PRead(file.Fd, buffer, 1 << 20));
        Assert.Equal(0, Posix.PRead(file.Fd, buffer, 2 << 20));
        Assert.Equal(4096, Posix.PRead(file.Fd, buffer, (1 << 20) - 4096));
    }

    [Fact]
    public async Task Writes_at_the_end_fail_with_ENOSPC_and_across_it_are_short()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        var data = Patterns.Generate(0, 8192, seed: 2);
        Assert.Equal(-Posix.ENOSPC, Posix.PWrite(file.Fd, data, 1 << 20));
        Assert.Equal(4096, Posix.PWrite(file.Fd, data, (1 << 20) - 4096));
        Assert.Equal(data.AsSpan(0, 4096).ToArray(), Backends.ReadBacking(mount.Device.Inner, (1 << 20) - 4096, 4096));
        Assert.Equal(1 << 20, new FileInfo(mount.FilePath).Length);
    }

    [Fact]
    public async Task The_size_is_fixed_truncation_is_refused()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        Assert.Equal(0, Posix.Ftruncate(file.Fd, 1 << 20));
        Assert.Equal(-Posix.EPERM, Posix.Ftruncate(file.Fd, 0));
        Assert.Equal(-Posix.EPERM, Posix.Ftruncate(file.Fd, 2 << 20));
        Assert.Equal(-Posix.EPERM, Posix.Open(mount.FilePath, Posix.ORdWr | Posix.OTrunc));
        Assert.Equal(1 << 20, new FileInfo(mount.FilePath).Length);
    }

    [Fact]
    public async Task No_other_file_can_be_created()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        Assert.Equal(-Posix.EPERM, Posix.Open(Path.Combine(mount.MountPoint, "other"), Posix.ORdWr | Posix.OCreat));
        Assert.Throws<UnauthorizedAccessException>(() => Directory.CreateDirectory(Path.Combine(mount.MountPoint, "sub")));
        Assert.Throws<UnauthorizedAccessException>(() => File.Delete(mount.FilePath));
        Assert.Equal(["disk"], Directory.GetFileSystemEntries(mount.MountPoint).Select(Path.GetFileName));
    }

    [Fact]
    public async Task Permissions_and_times_can_be_changed_and_stick()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20);
        File.SetUnixFileMode(mount.FilePath, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead);
        var when = new DateTime(2020, 1, 2, 3, 4, 5, DateTimeKind.Utc);
        File.SetLastWriteTimeUtc(mount.FilePath, when);
        var info = new FileInfo(mount.FilePath);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead, info.UnixFileMode);
        Assert.Equal(when, info.LastWriteTimeUtc);
    }

    [Fact]
    public async Task Page_cache_mode_reads_and_writes_the_device()
    {
        await using var mount = await TestMount.MemoryAsync(8 << 20, new FuseMountOptions { PageCache = true });
        var data = Patterns.Generate(4096, 100_000, seed: 9);
        using (var file = PosixFile.Open(mount.FilePath, Posix.ORdWr))
        {
            file.WriteExactly(data, 4096);
            Assert.Equal(0, Posix.Fsync(file.Fd));
            Assert.Equal(data, file.ReadExactly(4096, data.Length));
        }

        Assert.Equal(data, Backends.ReadBacking(mount.Device.Inner, 4096, data.Length));
    }
}
