using System.Diagnostics;
using System.Globalization;
using Spindle.Fuse.Native;
using Spindle.Protocol;

namespace Spindle.Fuse.Devices;

/// <summary>A bound loop device, as sysfs describes it.</summary>
/// <param name="Device">/dev/loopN.</param>
/// <param name="BackingFile">The file it reads and writes.</param>
/// <param name="DirectIo">Whether it submits direct, asynchronous I/O to the file (many requests in flight).</param>
/// <param name="ReadOnly">Whether it is read-only.</param>
public sealed record LoopDeviceInfo(string Device, string BackingFile, bool DirectIo, bool ReadOnly);

/// <summary>A loop device operation failed; <see cref="Errno"/> says why (EBUSY: in use).</summary>
public sealed class LoopDeviceException : Exception
{
    public LoopDeviceException(int errno, string message)
        : base(message) => Errno = errno;

    public LoopDeviceException()
        : this(Spindle.Protocol.Errno.EIO, "loop device operation failed")
    {
    }

    public LoopDeviceException(string message)
        : this(Spindle.Protocol.Errno.EIO, message)
    {
    }

    public LoopDeviceException(string message, Exception innerException)
        : base(message, innerException) => Errno = Spindle.Protocol.Errno.EIO;

    public int Errno { get; }
}

/// <summary>
/// Loop devices through util-linux's losetup (LOOP_CONFIGURE with a free device from loop-control), and their
/// state from /sys/block/loopN/loop. The kernel here has no nbd driver: a loop device on the file of a
/// <see cref="FuseMount"/> is how a block device, and a file system on it, is made from a remote export.
/// </summary>
public static class LoopDevice
{
    private const string Program = "losetup";
    private static readonly TimeSpan CommandTimeout = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Binds a free loop device to <paramref name="file"/> in direct-I/O mode (asynchronous requests straight to
    /// the file, no second page cache) and returns its path, /dev/loopN.
    /// </summary>
    public static async Task<string> AttachAsync(string file, bool readOnly, CancellationToken cancellationToken = default)
    {
        var arguments = new List<string> { "--find", "--show", "--direct-io=on" };
        if (readOnly)
        {
            arguments.Add("--read-only");
        }

        arguments.Add(file);
        var (exitCode, output, error) = await RunAsync(arguments, cancellationToken).ConfigureAwait(false);
        var device = output.Trim();
        if (exitCode != 0 || !device.StartsWith("/dev/loop", StringComparison.Ordinal))
        {
            throw new LoopDeviceException(Errno.EIO, $"losetup could not bind a loop device to {file}: {error.Trim()}");
        }

        return device;
    }

    /// <summary>
    /// Unbinds <paramref name="device"/> and waits (up to <paramref name="timeout"/>) until the kernel has let go
    /// of its file. Refuses (EBUSY) while a file system is mounted on it, and fails (EBUSY) if another process
    /// keeps it open past the timeout: the kernel then unbinds it when that process closes it.
    /// </summary>
    public static async Task DetachAsync(string device, TimeSpan timeout, CancellationToken cancellationToken = default)
    {
        if (Query(device) is null)
        {
            return;
        }

        if (IsClaimed(device))
        {
            throw new LoopDeviceException(Errno.EBUSY, $"{device} is in use (a file system is mounted on it, or a program holds it exclusively): unmount it first");
        }

        var (exitCode, _, error) = await RunAsync(["--detach", device], cancellationToken).ConfigureAwait(false);
        if (exitCode != 0 && Query(device) is not null)
        {
            throw new LoopDeviceException(Errno.EIO, $"losetup could not detach {device}: {error.Trim()}");
        }

        // With other openers the kernel only marks the device for automatic release (autoclear) and returns.
        var watch = Stopwatch.StartNew();
        while (Query(device) is not null)
        {
            if (watch.Elapsed > timeout)
            {
                throw new LoopDeviceException(Errno.EBUSY, $"{device} is still open by a process; it will be released when that process closes it");
            }

            await Task.Delay(50, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>The state of <paramref name="device"/>, or null if it is not bound (or not a loop device).</summary>
    public static LoopDeviceInfo? Query(string device)
    {
        var name = Path.GetFileName(device);
        if (!name.StartsWith("loop", StringComparison.Ordinal))
        {
            return null;
        }

        var directory = Path.Combine("/sys/block", name, "loop");
        try
        {
            var backing = File.ReadAllText(Path.Combine(directory, "backing_file")).TrimEnd('\n');
            var directIo = ReadFlag(Path.Combine(directory, "dio"));
            var readOnly = ReadFlag(Path.Combine("/sys/block", name, "ro"));
            return new LoopDeviceInfo("/dev/" + name, backing, directIo, readOnly);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>Every bound loop device.</summary>
    public static IReadOnlyList<LoopDeviceInfo> List()
    {
        var devices = new List<LoopDeviceInfo>();
        if (!Directory.Exists("/sys/block"))
        {
            return devices;
        }

        foreach (var entry in Directory.EnumerateFileSystemEntries("/sys/block", "loop*"))
        {
            if (Query(Path.GetFileName(entry)) is { } info)
            {
                devices.Add(info);
            }
        }

        devices.Sort((a, b) => string.CompareOrdinal(a.Device, b.Device));
        return devices;
    }

    /// <summary>
    /// Whether something holds <paramref name="device"/> exclusively: a mounted file system, mkfs, LVM. An
    /// exclusive open (O_EXCL on a block device) fails with EBUSY then.
    /// </summary>
    public static bool IsClaimed(string device)
    {
        var fd = LibC.OpenOrErrno(device, LibC.ORdOnly | LibC.OExcl | LibC.OCloExec);
        if (fd >= 0)
        {
            _ = LibC.Close(fd);
            return false;
        }

        return fd == -Errno.EBUSY;
    }

    private static bool ReadFlag(string path)
    {
        try
        {
            return File.ReadAllText(path).Trim() == "1";
        }
        catch (IOException)
        {
            return false;
        }
    }

    private static async Task<(int ExitCode, string Output, string Error)> RunAsync(IReadOnlyList<string> arguments, CancellationToken cancellationToken)
    {
        var program = new[] { "/usr/sbin", "/sbin", "/usr/bin", "/bin" }.Select(d => Path.Combine(d, Program)).FirstOrDefault(File.Exists)
                      ?? throw new LoopDeviceException(Errno.ENOENT, "losetup is not installed (Debian: apt-get install mount)");
        var startInfo = new ProcessStartInfo(program)
        {
            UseShellExecute = false,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        foreach (var argument in arguments)
        {
            startInfo.ArgumentList.Add(argument);
        }

        startInfo.Environment["LC_ALL"] = "C";
        using var process = Process.Start(startInfo) ?? throw new LoopDeviceException(Errno.EIO, "losetup did not start");
        var output = process.StandardOutput.ReadToEndAsync(cancellationToken);
        var error = process.StandardError.ReadToEndAsync(cancellationToken);
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(CommandTimeout);
        try
        {
            await process.WaitForExitAsync(timeout.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            process.Kill();
            throw new LoopDeviceException(Errno.ETIMEDOUT, string.Create(CultureInfo.InvariantCulture,
                $"losetup {string.Join(' ', arguments)} did not finish within {CommandTimeout.TotalSeconds} s"));
        }

        return (process.ExitCode, await output.ConfigureAwait(false), await error.ConfigureAwait(false));
    }
}
