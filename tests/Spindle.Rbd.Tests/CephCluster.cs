using Spindle.Storage.Rbd;
using Spindle.Testing;
using Xunit;

[assembly: AssemblyFixture(typeof(Spindle.Rbd.Tests.CephCluster))]

namespace Spindle.Rbd.Tests;

/// <summary>
/// One throwaway Ceph cluster (a monitor and a memstore OSD on 127.0.0.1) for the whole test run, started and
/// stopped by scripts/ceph-cluster.sh. If it cannot start, every test fails: a missing cluster is never a skip.
/// </summary>
public sealed class CephCluster : IAsyncLifetime
{
    public const string Pool = "rbd";

    /// <summary>Test images are small: the OSD keeps everything written in RAM.</summary>
    public const long DefaultImageSize = 64L << 20;

    private string? _directory;

    public string Directory => _directory ?? throw new InvalidOperationException("the cluster is not running");

    public string ConfigFile => Path.Combine(Directory, "ceph.conf");

    public string Keyring => Path.Combine(Directory, "ceph.client.admin.keyring");

    public static string RepositoryRoot { get; } = FindRepositoryRoot();

    public async ValueTask InitializeAsync()
    {
        foreach (var tool in new[] { "ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "rbd" })
        {
            PeerTool.Require(tool);
        }

        // Short: admin socket paths live under it and Unix socket paths are limited to 107 bytes.
        var directory = Path.Combine(Path.GetTempPath(), "spindle-ceph-" + Guid.NewGuid().ToString("N")[..8]);
        var script = Path.Combine(RepositoryRoot, "scripts", "ceph-cluster.sh");
        var result = await PeerTool.RunAsync(script, ["start", directory, "--watch", Environment.ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture)],
            TimeSpan.FromSeconds(90));
        if (result.ExitCode != 0)
        {
            throw new InvalidOperationException($"the test Ceph cluster did not start ({script} start {directory}): {result}");
        }

        _directory = directory;
    }

    public async ValueTask DisposeAsync()
    {
        if (_directory is not null)
        {
            await PeerTool.RunAsync(Path.Combine(RepositoryRoot, "scripts", "ceph-cluster.sh"), ["stop", _directory], TimeSpan.FromSeconds(60));
            _directory = null;
        }
    }

    /// <summary>Options that reach the test cluster as client.admin.</summary>
    public RbdOptions Options(string image, bool readOnly = false)
    {
        var options = new RbdOptions(RbdImageSpec.Parse(image)) { ConfigFile = ConfigFile, Keyring = Keyring, ReadOnly = readOnly };
        return options;
    }

    public RbdBlockDevice Open(string image, bool readOnly = false) => RbdBlockDevice.Open(Options(image, readOnly));

    /// <summary>Creates an image with a unique name and returns "pool/name".</summary>
    public async Task<string> CreateImageAsync(string prefix, long size = DefaultImageSize)
    {
        var name = $"{Pool}/{prefix}-{Guid.NewGuid().ToString("N")[..8]}";
        await RbdAsync("create", "--size", $"{size / 1024}K", name);
        return name;
    }

    /// <summary>Runs the rbd command against the test cluster and fails the test unless it succeeds.</summary>
    public Task<ProcessResult> RbdAsync(params string[] arguments) =>
        PeerTool.RunCheckedAsync("rbd", new[] { "--conf", ConfigFile, "--keyring", Keyring, "--id", "admin" }.Concat(arguments), TimeSpan.FromSeconds(120));

    /// <summary>The whole image (or snapshot) read by `rbd export`, independently of Spindle.</summary>
    public async Task<byte[]> ExportAsync(string image)
    {
        using var directory = new TempDirectory();
        var path = directory.File("export.img");
        await RbdAsync("export", "--no-progress", image, path);
        return await File.ReadAllBytesAsync(path);
    }

    /// <summary>Reads a range with python3-rbd (Debian's /usr/bin/python3), independently of Spindle.</summary>
    public async Task<byte[]> PythonReadAsync(string image, long offset, int length)
    {
        const string script = """
            import sys, rados, rbd
            conf, keyring, spec, offset, length = sys.argv[1:6]
            pool, name = spec.split("/", 1)
            cluster = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
            cluster.connect(timeout=20)
            with cluster.open_ioctx(pool) as ioctx:
                with rbd.Image(ioctx, name, read_only=True) as image:
                    sys.stdout.write(image.read(int(offset), int(length)).hex())
            cluster.shutdown()
            """;
        var result = await PeerTool.RunPythonAsync(script, [ConfigFile, Keyring, image, offset.ToString(System.Globalization.CultureInfo.InvariantCulture), length.ToString(System.Globalization.CultureInfo.InvariantCulture)],
            TimeSpan.FromSeconds(60));
        Assert.True(result.ExitCode == 0, $"python3-rbd read failed: {result}");
        return Convert.FromHexString(result.StandardOutput.Trim());
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
