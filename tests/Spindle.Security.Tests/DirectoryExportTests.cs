using System.Buffers.Binary;
using System.Text;
using Spindle.Protocol;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Server.Security;
using Spindle.Testing;
using Xunit;

namespace Spindle.Security.Tests;

/// <summary>
/// Directory exports (RNBD's device search path): images opened on demand by relative name, per-session namespaces,
/// and export names treated as hostile input that can never reach outside the directory.
/// </summary>
public sealed class DirectoryExportTests(CertificateFixture fixture) : IClassFixture<CertificateFixture>
{
    private static async Task WriteImageAsync(string path, int seed, int size = 1 << 20)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        await File.WriteAllBytesAsync(path, Patterns.Generate(0, size, seed));
    }

    private static Task<TestServer> ServeAsync(string root, bool readOnly = false, Action<ServerOptions>? configure = null, TlsMode? tls = null) =>
        TestServer.StartAsync(
            catalog => catalog.Add(new DirectoryExportProvider(new DirectoryExportOptions { Root = root, Template = new ExportOptions { ReadOnly = readOnly, Tls = tls } })),
            configure);

    private static async Task<(OptionReplyType Type, string Message, ulong Size)> InfoAsync(RawNbdClient client, byte[] name)
    {
        var data = new byte[4 + name.Length + 2];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)name.Length);
        name.CopyTo(data, 4);
        await client.SendOptionAsync(NbdOption.Info, data);
        var replies = await client.ReadOptionRepliesAsync(NbdOption.Info);
        var size = 0ul;
        foreach (var (header, payload) in replies)
        {
            if (header.Type == OptionReplyType.Info && InfoReplies.TryReadExport(payload, out var s, out _))
            {
                size = s;
            }
        }

        return (replies[^1].Header.Type, Encoding.UTF8.GetString(replies[^1].Data), size);
    }

    [Fact]
    public async Task Images_are_served_by_relative_name_and_opened_on_demand()
    {
        using var directory = new TempDirectory();
        var root = directory.File("disks");
        await WriteImageAsync(Path.Combine(root, "a.img"), 1);
        await WriteImageAsync(Path.Combine(root, "team", "b.img"), 2, 2 << 20);
        File.CreateSymbolicLink(Path.Combine(root, "alias.img"), "a.img");
        await using var server = await ServeAsync(root);
        var provider = server.Catalog.Directories[0];

        await using (var client = await RawNbdClient.ConnectAsync(server.EndPoint))
        {
            await client.StartAsync();
            await client.SendOptionAsync(NbdOption.List);
            var names = (await client.ReadOptionRepliesAsync(NbdOption.List)).SkipLast(1).Select(r => ServerReply.TryParse(r.Data, out var n, out _) ? n : "?").ToList();
            Assert.Equal(["a.img", "team/b.img"], names); // symlinks are served but not listed
            Assert.Equal(2ul << 20, (await InfoAsync(client, "team/b.img"u8.ToArray())).Size);
            Assert.Equal(0, provider.OpenCount); // INFO gave the image back
            Assert.Equal(OptionReplyType.Ack, (await InfoAsync(client, "alias.img"u8.ToArray())).Type);
        }

        await using (var client = await RawNbdClient.ConnectAsync(server.EndPoint))
        {
            await client.NegotiateAsync("team/b.img");
            Assert.Equal(1, provider.OpenCount);
            await client.SendRequestAsync(NbdCommand.Read, 1, 4096, 4096);
            Assert.Equal(Patterns.Generate(4096, 4096, 2), RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(1), 4096, 4096));
            await client.SendRequestAsync(NbdCommand.Write, 2, 0, 4096, CommandFlags.None, Patterns.Generate(0, 4096, 9));
            Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
            await client.SendRequestAsync(NbdCommand.Disconnect, 3, 0, 0);
            Assert.True(await client.WaitForCloseAsync());
        }

        for (var i = 0; i < 250 && provider.OpenCount > 0; i++)
        {
            await Task.Delay(20);
        }

        Assert.Equal(0, provider.OpenCount); // closed once the last connection left
        Assert.Equal(Patterns.Generate(0, 4096, 9), (await File.ReadAllBytesAsync(Path.Combine(root, "team", "b.img")))[..4096]);
    }

    public static TheoryData<string, byte[], OptionReplyType> Traversals => new()
    {
        { "dot-dot", "../outside.img"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "dot-dot inside", "team/../../outside.img"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "absolute path", "/etc/passwd"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "absolute path to the outside file", Encoding.UTF8.GetBytes("/tmp/x/../outside.img"), OptionReplyType.ErrorInvalid },
        { "NUL", "a.img\0../../etc/passwd"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "control character", "a.img\u0001"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "newline", "a.img\nb"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "invalid UTF-8", [0x61, 0xff, 0x62], OptionReplyType.ErrorInvalid },
        { "over-long name", Encoding.UTF8.GetBytes(string.Join('/', Enumerable.Repeat(new string('x', 200), 8))), OptionReplyType.ErrorInvalid },
        { "over-long component", Encoding.UTF8.GetBytes(new string('y', 300)), OptionReplyType.ErrorInvalid },
        { "empty component", "team//b.img"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "dot", "./a.img"u8.ToArray(), OptionReplyType.ErrorInvalid },
        { "symlink to a file outside", "escape.img"u8.ToArray(), OptionReplyType.ErrorPolicy },
        { "symlinked directory leading outside", "outdir/outside.img"u8.ToArray(), OptionReplyType.ErrorPolicy },
        { "a directory", "team"u8.ToArray(), OptionReplyType.ErrorPolicy },
        { "no such image", "missing.img"u8.ToArray(), OptionReplyType.ErrorUnknown },
    };

    [Theory]
    [MemberData(nameof(Traversals))]
    public async Task Each_traversal_attempt_is_refused_and_logged(string attack, byte[] name, OptionReplyType expected)
    {
        using var directory = new TempDirectory();
        var root = directory.File("disks");
        await WriteImageAsync(Path.Combine(root, "a.img"), 1);
        await WriteImageAsync(Path.Combine(root, "team", "b.img"), 2);
        var outside = directory.File("outside.img");
        await WriteImageAsync(outside, 3);
        var before = await File.ReadAllBytesAsync(outside);
        File.CreateSymbolicLink(Path.Combine(root, "escape.img"), outside);
        File.CreateSymbolicLink(Path.Combine(root, "outdir"), directory.Path);
        await using var server = await ServeAsync(root);

        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.StartAsync();
        var (type, message, size) = await InfoAsync(client, name);
        Assert.True(type == expected, $"{attack}: got {type} ({message})");
        Assert.Equal(0ul, size);

        // The same name through GO, then a write attempt if it were let in: nothing outside changes.
        var go = new byte[4 + name.Length + 2];
        BinaryPrimitives.WriteUInt32BigEndian(go, (uint)name.Length);
        name.CopyTo(go, 4);
        await client.SendOptionAsync(NbdOption.Go, go);
        Assert.True((await client.ReadOptionRepliesAsync(NbdOption.Go))[^1].Header.IsError, attack);
        Assert.Equal(before, await File.ReadAllBytesAsync(outside));
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "127.0.0.1", "NBD_OPT_INFO refused");

        // And the server still serves a good name on the same connection.
        Assert.Equal(OptionReplyType.Ack, (await InfoAsync(client, "a.img"u8.ToArray())).Type);
    }

    [Fact]
    public async Task Export_name_traversal_closes_the_connection_without_touching_anything()
    {
        using var directory = new TempDirectory();
        var root = directory.File("disks");
        await WriteImageAsync(Path.Combine(root, "a.img"), 1);
        await using var server = await ServeAsync(root);
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, "../../../etc/passwd"u8);
        Assert.True(await client.WaitForCloseAsync());
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "EXPORT_NAME", "'..' component");
    }

    [Fact]
    public async Task A_read_only_directory_refuses_writes()
    {
        using var directory = new TempDirectory();
        var root = directory.File("disks");
        await WriteImageAsync(Path.Combine(root, "a.img"), 1);
        await using var server = await ServeAsync(root, readOnly: true);
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        var (_, flags) = await client.NegotiateAsync("a.img");
        Assert.True(flags.HasFlag(TransmissionFlags.ReadOnly));
        await client.SendRequestAsync(NbdCommand.Write, 1, 0, 512, CommandFlags.None, new byte[512]);
        Assert.Equal(NbdError.NotPermitted, (await client.ReadReplyAsync()).AnyError);
        Assert.Equal(Patterns.Generate(0, 512, 1), (await File.ReadAllBytesAsync(Path.Combine(root, "a.img")))[..512]);
    }

    [Fact]
    public async Task Each_tls_client_sees_only_its_own_session_directory()
    {
        using var directory = new TempDirectory();
        var root = directory.File("sessions");
        await WriteImageAsync(Path.Combine(root, "client1", "disk.img"), 11);
        await WriteImageAsync(Path.Combine(root, "client2", "disk.img"), 22, 2 << 20);
        await using var server = await TestServer.StartAsync(
            catalog => catalog.Add(new DirectoryExportProvider(new DirectoryExportOptions
            {
                Root = Path.Combine(root, DirectoryExportOptions.SessionPlaceholder),
                Prefix = "mine",
                Template = new ExportOptions { Tls = TlsMode.Require },
            })),
            fixture.Tls(TlsMode.On));
        var certificates = fixture.Certificates;

        var one = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", $"nbds://localhost:{server.Port}/mine/disk.img?tls-certificates={certificates.Directory}"]);
        Assert.Equal((1 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), one.StandardOutput.Trim());
        var two = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", $"nbds://localhost:{server.Port}/mine/disk.img?tls-certificates={certificates.SecondClientDirectory}"]);
        Assert.Equal((2 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), two.StandardOutput.Trim());

        var list = await PeerTool.RunCheckedAsync("nbdinfo", ["--list", "--json", $"nbds://localhost:{server.Port}/?tls-certificates={certificates.Directory}"]);
        Assert.Contains("mine/disk.img", list.StandardOutput, StringComparison.Ordinal);
        Assert.DoesNotContain("client2", list.StandardOutput, StringComparison.Ordinal);

        // client1 cannot climb into client2's directory.
        await using var client = await TlsClient.ConnectAsync(server, certificates, certificates.Directory);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await InfoAsync(client, "mine/../client2/disk.img"u8.ToArray())).Type);
    }

    [Fact]
    public async Task Session_names_by_address_and_clients_without_one()
    {
        using var directory = new TempDirectory();
        var root = directory.File("sessions");
        await WriteImageAsync(Path.Combine(root, "local", "x.img"), 5);
        await WriteImageAsync(Path.Combine(root, "sock", "y.img"), 6);
        await using var server = await TestServer.StartAsync(
            catalog => catalog.Add(new DirectoryExportProvider(new DirectoryExportOptions { Root = Path.Combine(root, DirectoryExportOptions.SessionPlaceholder) })),
            options =>
            {
                options.SessionNames.Add(Cli.Hosting.IniConfigurationReader.ParseSessionName("local=127.0.0.0/8", "test"));
                options.SessionNames.Add(Cli.Hosting.IniConfigurationReader.ParseSessionName("sock=unix", "test"));
            });
        await using (var tcp = await RawNbdClient.ConnectAsync(server.EndPoint))
        {
            await tcp.StartAsync();
            Assert.Equal(OptionReplyType.Ack, (await InfoAsync(tcp, "x.img"u8.ToArray())).Type);
            Assert.Equal(OptionReplyType.ErrorUnknown, (await InfoAsync(tcp, "y.img"u8.ToArray())).Type);
        }

        await using (var unix = await RawNbdClient.ConnectUnixAsync(server.UnixSocketPath))
        {
            await unix.StartAsync();
            Assert.Equal(OptionReplyType.Ack, (await InfoAsync(unix, "y.img"u8.ToArray())).Type);
        }

        // A server with no mapping for the client: no session, no images.
        await using var bare = await TestServer.StartAsync(catalog => catalog.Add(new DirectoryExportProvider(new DirectoryExportOptions { Root = Path.Combine(root, DirectoryExportOptions.SessionPlaceholder) })));
        await using var nobody = await RawNbdClient.ConnectAsync(bare.EndPoint);
        await nobody.StartAsync();
        var (type, message, _) = await InfoAsync(nobody, "x.img"u8.ToArray());
        Assert.Equal(OptionReplyType.ErrorPolicy, type);
        Assert.Contains("no session name", message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("alice", true)]
    [InlineData("../alice", false)]
    [InlineData("a/b", false)]
    [InlineData("..", false)]
    [InlineData("", false)]
    [InlineData("bad\u0000name", false)]
    public void Session_names_must_be_one_safe_path_component(string name, bool safe) =>
        Assert.Equal(safe, DirectoryExportProvider.IsSafeSessionName(name, out _));

    [Fact]
    public async Task Spindle_serve_dir_from_the_command_line()
    {
        using var directory = new TempDirectory();
        var root = directory.File("disks");
        await WriteImageAsync(Path.Combine(root, "vm1.img"), 1, 3 << 20);
        var spindle = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo(SpindleExecutable.Path)
        {
            ArgumentList = { "serve", "--dir", root, "-r", "--bind", "127.0.0.1", "--port", "0", "--print-uri" },
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        })!;
        try
        {
            var uri = (await spindle.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30)))!;
            var list = await PeerTool.RunCheckedAsync("nbdinfo", ["--list", uri]);
            Assert.Contains("vm1.img", list.StandardOutput, StringComparison.Ordinal);
            var size = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", uri + "vm1.img"]);
            Assert.Equal((3 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), size.StandardOutput.Trim());
            var escape = await PeerTool.RunAsync("nbdinfo", ["--size", uri + "..%2Fetc%2Fpasswd"]);
            Assert.NotEqual(0, escape.ExitCode);
        }
        finally
        {
            spindle.Kill(entireProcessTree: true);
            await spindle.WaitForExitAsync();
        }
    }
}
