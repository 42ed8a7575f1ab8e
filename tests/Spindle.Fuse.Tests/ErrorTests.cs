using Spindle.Fuse.Tests.Support;
using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Fuse.Tests;

/// <summary>Backend failures reach programs as the errno they mean; read-only devices give a read-only file.</summary>
public sealed class ErrorTests
{
    [Theory]
    [InlineData(NbdError.NoSpace, Posix.ENOSPC)]
    [InlineData(NbdError.IO, Posix.EIO)]
    [InlineData(NbdError.NotPermitted, Posix.EPERM)]
    [InlineData(NbdError.InvalidArgument, Posix.EINVAL)]
    public async Task A_failed_write_reports_the_backend_error(NbdError error, int errno)
    {
        await using var mount = await TestMount.MemoryAsync(configure: device =>
            device.Fault = (operation, offset, _) => operation == "write" && offset == 1 << 20 ? new BlockDeviceException(error, "injected") : null);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        Assert.Equal(-errno, Posix.PWrite(file.Fd, Patterns.Generate(0, 4096), 1 << 20));

        // Only that request failed.
        file.WriteExactly(Patterns.Generate(0, 4096), 0);
        Assert.Equal(Patterns.Generate(0, 4096), file.ReadExactly(0, 4096));
    }

    [Fact]
    public async Task Failed_reads_and_flushes_report_EIO()
    {
        await using var mount = await TestMount.MemoryAsync(configure: device =>
            device.Fault = (operation, offset, _) => operation switch
            {
                "read" when offset == 2 << 20 => new IOException("injected", 5),
                "flush" => new BlockDeviceException(NbdError.IO, "injected"),
                _ => null,
            });
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        var buffer = new byte[4096];
        Assert.Equal(-Posix.EIO, Posix.PRead(file.Fd, buffer, 2 << 20));
        Assert.Equal(4096, Posix.PRead(file.Fd, buffer, 0));
        Assert.Equal(-Posix.EIO, Posix.Fsync(file.Fd));
    }

    [Fact]
    public async Task An_unexpected_exception_becomes_EIO_and_the_mount_keeps_serving()
    {
        await using var mount = await TestMount.MemoryAsync(configure: device =>
            device.Fault = (operation, offset, _) => operation == "write" && offset == 0 ? new InvalidOperationException("bug") : null);
        using var file = PosixFile.Open(mount.FilePath, Posix.ORdWr);
        Assert.Equal(-Posix.EIO, Posix.PWrite(file.Fd, new byte[512], 0));
        file.WriteExactly(new byte[512], 4096);
    }

    [Fact]
    public async Task A_read_only_device_gives_a_read_only_file()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20, readOnly: true);
        Assert.True(mount.Mount.ReadOnly);
        Assert.Equal(UnixFileMode.UserRead, new FileInfo(mount.FilePath).UnixFileMode);
        Assert.Equal(-Posix.EROFS, Posix.Open(mount.FilePath, Posix.ORdWr));
        Assert.Equal(-Posix.EROFS, Posix.Open(mount.FilePath, Posix.OWrOnly));
        Assert.Throws<IOException>(() => File.SetUnixFileMode(mount.FilePath, UnixFileMode.UserRead | UnixFileMode.UserWrite));

        using var file = PosixFile.Open(mount.FilePath, Posix.ORdOnly);
        Assert.Equal(new byte[4096], file.ReadExactly(0, 4096));
        Assert.Equal(0, mount.Device.Count("write"));
    }

    [Fact]
    public async Task The_read_only_option_protects_a_writable_device()
    {
        await using var mount = await TestMount.MemoryAsync(1 << 20, new FuseMountOptions { ReadOnly = true });
        Assert.Equal(-Posix.EROFS, Posix.Open(mount.FilePath, Posix.ORdWr));
        var result = await PeerTool.RunAsync("dd", ["if=/dev/zero", $"of={mount.FilePath}", "bs=4096", "count=1", "conv=notrunc"]);
        Assert.NotEqual(0, result.ExitCode);
        Assert.Contains("Read-only file system", result.StandardError, StringComparison.Ordinal);
        Assert.Contains(MountTable.Read(), entry => entry.MountPoint == mount.MountPoint);
    }

    [Fact]
    public void Errors_map_to_the_errno_a_program_expects()
    {
        Assert.Equal(Posix.ENOSPC, BlockDeviceFile.ToErrno(new BlockDeviceException(NbdError.NoSpace, "full")));
        Assert.Equal(Posix.EOPNOTSUPP, BlockDeviceFile.ToErrno(new BlockDeviceException(NbdError.NotSupported, "no")));
        Assert.Equal(108, BlockDeviceFile.ToErrno(new BlockDeviceException(NbdError.Shutdown, "going away")));
        Assert.Equal(Posix.ENOSPC, BlockDeviceFile.ToErrno(new IOException("disk full", Posix.ENOSPC)));
        Assert.Equal(Posix.EACCES, BlockDeviceFile.ToErrno(new UnauthorizedAccessException()));
        Assert.Equal(Posix.EIO, BlockDeviceFile.ToErrno(new IOException("no errno")));
        Assert.Equal(Posix.EIO, BlockDeviceFile.ToErrno(new InvalidOperationException()));
    }
}
