using System.Diagnostics;
using Spindle.Testing;
using Xunit;

namespace Spindle.Kernel.Tests;

/// <summary>
/// The small VM that runs Debian's kernel with nbd.ko and the real nbd-client (scripts/kernel-vm). Building it once
/// (download of the kernel package, initramfs) happens when the collection starts; each test then boots it with its
/// own scenario. A missing QEMU or kernel fails the tests: the kernel client is never skipped.
/// </summary>
public sealed class KernelVm : IAsyncLifetime
{
    /// <summary>The host's 127.0.0.1 as the guest sees it (QEMU user-mode networking).</summary>
    public const string HostAddress = "10.0.2.2";

    /// <summary>Hard limit of one boot; the guest's own watchdog fires 10 s earlier and reports.</summary>
    /// <remarks>Generous because without usable KVM the guest runs under TCG on a CI machine shared with other tests.</remarks>
    public static readonly TimeSpan BootLimit = TimeSpan.FromSeconds(300);

    private static readonly TimeSpan BuildLimit = TimeSpan.FromMinutes(15);

    private readonly TempDirectory _packs = new();
    private readonly SemaphoreSlim _packLock = new(1, 1);
    private readonly Dictionary<string, string> _packed = new(StringComparer.Ordinal);

    public KernelVm()
    {
        ScriptDirectory = Path.Combine(FindRepositoryRoot(), "scripts", "kernel-vm");
    }

    public string ScriptDirectory { get; }

    /// <summary>The cache directory build.sh printed (vmlinuz, initramfs.gz, kernel-package).</summary>
    public string BuildDirectory { get; private set; } = string.Empty;

    /// <summary>The Debian package the kernel came from, e.g. "linux-image-6.1.0-56-amd64 6.1.192-2".</summary>
    public string KernelPackage { get; private set; } = string.Empty;

    public async ValueTask InitializeAsync()
    {
        PeerTool.Require("qemu-system-x86_64");
        PeerTool.Require("busybox");
        PeerTool.Require("nbd-client");
        var build = await PeerTool.RunAsync(Path.Combine(ScriptDirectory, "build.sh"), [], BuildLimit);
        Assert.True(build.ExitCode == 0, $"scripts/kernel-vm/build.sh could not build the VM (run scripts/install-deps.sh; the kernel package is downloaded with apt-get): {build}");
        BuildDirectory = build.StandardOutput.Trim();
        KernelPackage = (await File.ReadAllTextAsync(Path.Combine(BuildDirectory, "kernel-package"))).Trim();
    }

    public ValueTask DisposeAsync()
    {
        _packs.Dispose();
        return ValueTask.CompletedTask;
    }

    /// <summary>
    /// An initramfs segment holding Spindle's own executable (the one the tests run, Native AOT in CI) as
    /// /usr/local/bin/spindle, with the libraries ldd lists and the OpenSSL libraries .NET loads at run time for TLS.
    /// Packed once per test run.
    /// </summary>
    public Task<string> SpindleInitrdAsync()
    {
        // The guest has no .NET runtime: an apphost (spindle beside spindle.dll) cannot run there.
        Assert.False(File.Exists(SpindleExecutable.Path + ".dll"),
            $"{SpindleExecutable.Path} needs the .NET runtime, which the guest lacks: publish the native executable (./spindle --version) and set {SpindleExecutable.Variable}=artifacts/spindle/spindle, as scripts/test.sh does");
        return PackOnceAsync("spindle.gz", ["--lib", "libssl.so.3", "--lib", "libcrypto.so.3", $"{SpindleExecutable.Path}=/usr/local/bin/spindle"]);
    }

    /// <summary>
    /// An initramfs segment holding this machine's fio with its libraries (about 80 MB unpacked: Debian links its
    /// rbd and gluster engines in), kept out of the base image the other tests boot. Packed once per test run.
    /// </summary>
    public Task<string> FioInitrdAsync() => PackOnceAsync("fio.gz", [PeerTool.Require("fio")]);

    private async Task<string> PackOnceAsync(string name, IReadOnlyList<string> arguments)
    {
        await _packLock.WaitAsync();
        try
        {
            if (!_packed.TryGetValue(name, out var output))
            {
                output = Path.Combine(_packs.Path, name);
                var pack = await PeerTool.RunAsync(Path.Combine(ScriptDirectory, "pack.sh"), [output, .. arguments], TimeSpan.FromMinutes(2));
                Assert.True(pack.ExitCode == 0, $"pack.sh could not pack {string.Join(' ', arguments)}: {pack}");
                _packed[name] = output;
            }

            return output;
        }
        finally
        {
            _packLock.Release();
        }
    }

    /// <summary>
    /// Boots the VM with <paramref name="script"/> as /scenario/scenario.sh (and <paramref name="files"/> beside it),
    /// waits for it to power off and returns what it reported. The console goes to the test output.
    /// </summary>
    public async Task<VmReport> RunAsync(string script, IReadOnlyDictionary<string, byte[]>? files = null, int cpus = 1, string memory = "512M",
        IReadOnlyList<string>? extraInitrds = null, TimeSpan? limit = null)
    {
        var bootLimit = limit ?? BootLimit;
        using var directory = new TempDirectory();
        var scenario = Path.Combine(directory.Path, "scenario");
        Directory.CreateDirectory(scenario);
        await File.WriteAllTextAsync(Path.Combine(scenario, "scenario.sh"), script.ReplaceLineEndings("\n"));
        foreach (var (name, bytes) in files ?? new Dictionary<string, byte[]>())
        {
            var target = Path.Combine(scenario, name);
            Directory.CreateDirectory(Path.GetDirectoryName(target)!);
            await File.WriteAllBytesAsync(target, bytes);
        }

        var watch = Stopwatch.StartNew();
        List<string> arguments = ["--timeout", ((int)bootLimit.TotalSeconds).ToString(System.Globalization.CultureInfo.InvariantCulture),
            "--cpus", cpus.ToString(System.Globalization.CultureInfo.InvariantCulture), "--memory", memory];
        foreach (var extra in extraInitrds ?? [])
        {
            arguments.AddRange(["--initrd-extra", extra]);
        }

        arguments.Add(scenario);
        var result = await PeerTool.RunAsync(Path.Combine(ScriptDirectory, "run.sh"), arguments, bootLimit + TimeSpan.FromMinutes(2));
        var report = new VmReport(result.ExitCode, result.StandardOutput, result.StandardError, watch.Elapsed);
        var output = TestContext.Current.TestOutputHelper;
        output?.WriteLine($"VM ({KernelPackage}, {cpus} CPU, {memory}): exit {result.ExitCode} after {watch.Elapsed.TotalSeconds:F1} s, guest booted in {report.BootSeconds?.ToString("F1", System.Globalization.CultureInfo.InvariantCulture) ?? "?"} s");
        output?.WriteLine(report.ToString());
        return report;
    }

    private static string FindRepositoryRoot()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "Spindle.slnx")))
            {
                return directory.FullName;
            }
        }

        throw new InvalidOperationException($"no Spindle.slnx above {AppContext.BaseDirectory}");
    }
}

/// <summary>The kernel tests share one VM build and run one at a time: each boot wants the machine's CPUs.</summary>
[CollectionDefinition(Name)]
public sealed class KernelVmCollection : ICollectionFixture<KernelVm>
{
    public const string Name = "kernel vm";
}
