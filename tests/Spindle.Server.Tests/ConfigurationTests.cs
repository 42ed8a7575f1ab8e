using System.Net;
using Spindle.Cli.Hosting;
using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>The nbd-server style configuration file.</summary>
public sealed class ConfigurationTests
{
    [Fact]
    public void Reads_generic_and_export_sections()
    {
        var configuration = IniConfigurationReader.Parse("""
            # a comment
            [generic]
                port = 1234
                listenaddr = 127.0.0.1, ::1
                allowlist = false
                default = disk
                max_connections = 10
                handshake_timeout = 3
                user = nbd

            [disk]
                exportname = /srv/disk.img
                readonly = true
                description = the disk
                trim = false
                rotational = true
                minblocksize = 512
                preferredblocksize = 4096
                maxblocksize = 1048576

            [scratch]
                backend = memory
                size = 1.5G
            """);
        configuration.ResolveEndpoints();
        Assert.Equal([new ListenEndpoint.Tcp(IPAddress.Loopback, 1234), new ListenEndpoint.Tcp(IPAddress.IPv6Loopback, 1234)], configuration.Server.Endpoints);
        Assert.False(configuration.Server.AllowList);
        Assert.Equal("disk", configuration.DefaultExport);
        Assert.Equal(10, configuration.Server.MaxConnections);
        Assert.Equal(TimeSpan.FromSeconds(3), configuration.Server.HandshakeTimeout);
        Assert.Equal("nbd", configuration.User);
        Assert.DoesNotContain(configuration.Warnings, w => w.Contains("'user'", StringComparison.Ordinal));

        var disk = configuration.Exports[0];
        Assert.Equal(("disk", "file", "/srv/disk.img"), (disk.Options.Name, disk.Backend, disk.Location));
        Assert.True(disk.Options.ReadOnly);
        Assert.False(disk.Options.Trim);
        Assert.True(disk.Options.Rotational);
        Assert.Equal("the disk", disk.Options.Description);
        Assert.Equal(new BlockSizeConstraints(512, 4096, 1048576), disk.Options.BlockSizes);

        var scratch = configuration.Exports[1];
        Assert.Equal(("memory", 3L << 29), (scratch.Backend, scratch.Size));
    }

    [Fact]
    public void Unix_socket_listens_alone_unless_dual_listen()
    {
        var unixOnly = IniConfigurationReader.Parse("[generic]\nunixsock = /run/nbd.sock\n[d]\nexportname = /x\n");
        unixOnly.ResolveEndpoints();
        Assert.Equal([new ListenEndpoint.Unix("/run/nbd.sock")], unixOnly.Server.Endpoints);

        var dual = IniConfigurationReader.Parse("[generic]\nunixsock = /run/nbd.sock\nduallisten = true\n[d]\nexportname = /x\n");
        dual.ResolveEndpoints();
        Assert.Equal([new ListenEndpoint.Unix("/run/nbd.sock"), new ListenEndpoint.Tcp(IPAddress.IPv6Any, NbdLimits.DefaultPort)], dual.Server.Endpoints);
    }

    [Fact]
    public void Nbd_server_default_listenaddr_binds_one_dual_stack_socket()
    {
        var configuration = IniConfigurationReader.Parse("[generic]\nlistenaddr = ::, 0.0.0.0\nport = 9999\n[d]\nexportname = /x\n");
        configuration.ResolveEndpoints();
        Assert.Equal([new ListenEndpoint.Tcp(IPAddress.IPv6Any, 9999)], configuration.Server.Endpoints);
    }

    [Theory]
    [InlineData("[generic]\nbogus = 1\n", "unknown [generic] key 'bogus'", 2)]
    [InlineData("[d]\nexportname = /x\nmultifile = true\n", "'multifile' is not supported", 3)]
    [InlineData("[d]\nexportname = /x\nreadonly = maybe\n", "must be true or false", 3)]
    [InlineData("[d]\nreadonly = true\n", "needs 'exportname", 1)]
    [InlineData("[d]\nbackend = memory\n", "needs 'size", 1)]
    [InlineData("[d]\nexportname = /x\n[d]\nexportname = /y\n", "defined twice", 3)]
    [InlineData("port = 1\n", "before any [section]", 1)]
    [InlineData("[d\n", "no closing", 1)]
    [InlineData("[d]\nsize = lots\nbackend = memory\n", "not a size", 2)]
    [InlineData("[generic]\nport = 70000\n", "from 0 to 65535", 2)]
    public void Mistakes_are_reported_with_file_and_line(string text, string message, int line)
    {
        var exception = Assert.Throws<ConfigurationException>(() => IniConfigurationReader.Parse(text, "test.conf"));
        Assert.Contains(message, exception.Message, StringComparison.Ordinal);
        Assert.Contains($"test.conf:{line}", exception.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Includedir_adds_exports_from_conf_files()
    {
        using var directory = new TempDirectory();
        Directory.CreateDirectory(directory.File("conf.d"));
        File.WriteAllText(directory.File("conf.d/b.conf"), "[second]\nexportname = /b\n");
        File.WriteAllText(directory.File("conf.d/a.conf"), "[first]\nexportname = /a\n");
        File.WriteAllText(directory.File("conf.d/ignored.txt"), "[nope]\nexportname = /n\n");
        File.WriteAllText(directory.File("config"), "[generic]\nincludedir = conf.d\n");
        var configuration = IniConfigurationReader.ReadFile(directory.File("config"));
        Assert.Equal(["first", "second"], configuration.Exports.Select(e => e.Options.Name));

        File.WriteAllText(directory.File("conf.d/c.conf"), "[generic]\nport = 1\n");
        Assert.Throws<ConfigurationException>(() => IniConfigurationReader.ReadFile(directory.File("config")));
    }

    [Theory]
    [InlineData("4096", 4096L)]
    [InlineData("1G", 1L << 30)]
    [InlineData("1GiB", 1L << 30)]
    [InlineData("512m", 512L << 20)]
    [InlineData("2T", 2L << 40)]
    [InlineData("10K", 10240L)]
    [InlineData("0.5M", 512L << 10)]
    public void Sizes_use_binary_suffixes(string text, long expected) => Assert.Equal(expected, SizeParser.Parse(text));

    [Theory]
    [InlineData("")]
    [InlineData("-1")]
    [InlineData("1Q")]
    [InlineData("1.3")]
    [InlineData("99999999999E")]
    public void Bad_sizes_are_refused(string text) => Assert.False(SizeParser.TryParse(text, out _));
}
