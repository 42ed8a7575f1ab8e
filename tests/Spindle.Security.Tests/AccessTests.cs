using Spindle.Cli.Hosting;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Server.Security;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Security.Tests;

/// <summary>Who may connect to what: address and identity allow lists, connection limits, idle and byte limits.</summary>
public sealed class AccessTests(CertificateFixture fixture) : IClassFixture<CertificateFixture>
{
    private static ExportAccess Addresses(params string[] entries)
    {
        var (rules, unix) = ExportAccess.ParseAddresses(entries, "test");
        return new ExportAccess { Addresses = rules, AllowUnix = unix };
    }

    private static async Task<(OptionReplyType Type, string Message)> GoAsync(RawNbdClient client, string export)
    {
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest(export, []).ToBytes());
        var last = (await client.ReadOptionRepliesAsync(NbdOption.Go))[^1];
        return (last.Header.Type, System.Text.Encoding.UTF8.GetString(last.Data));
    }

    [Fact]
    public async Task An_address_outside_the_allow_list_gets_policy_and_a_log_line_naming_the_rule()
    {
        await using var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "lan", Access = Addresses("10.0.0.0/8", "192.168.1.5") }, new MemoryBlockDevice(1 << 20)));
            catalog.Add(new Export(new ExportOptions { Name = "local", Access = Addresses("127.0.0.0/8") }, new MemoryBlockDevice(1 << 20)));
        });
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.StartAsync();

        await client.SendOptionAsync(NbdOption.List);
        var listed = (await client.ReadOptionRepliesAsync(NbdOption.List)).SkipLast(1).Select(r => ServerReply.TryParse(r.Data, out var n, out _) ? n : "?").Where(n => !n.StartsWith("by-", StringComparison.Ordinal)).ToList();
        Assert.Equal(["local"], listed);

        var (type, message) = await GoAsync(client, "lan");
        Assert.Equal(OptionReplyType.ErrorPolicy, type);
        Assert.Contains("address allow list", message, StringComparison.Ordinal);
        var line = await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "127.0.0.1", "ErrorPolicy", "10.0.0.0/8");
        Assert.Contains("NBD_OPT_GO", line, StringComparison.Ordinal);

        Assert.Equal(OptionReplyType.Ack, (await GoAsync(client, "local")).Type);
    }

    [Fact]
    public async Task Unix_socket_clients_need_unix_in_an_address_list()
    {
        await using var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "tcp-only", Access = Addresses("127.0.0.1") }, new MemoryBlockDevice(1 << 20)));
            catalog.Add(new Export(new ExportOptions { Name = "both", Access = Addresses("127.0.0.1", "unix") }, new MemoryBlockDevice(1 << 20)));
        });
        await using var client = await RawNbdClient.ConnectUnixAsync(server.UnixSocketPath);
        await client.StartAsync();
        Assert.Equal(OptionReplyType.ErrorPolicy, (await GoAsync(client, "tcp-only")).Type);
        Assert.Equal(OptionReplyType.Ack, (await GoAsync(client, "both")).Type);
    }

    [Fact]
    public async Task Export_name_refused_by_policy_closes_the_connection()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(1 << 20), name: "lan");
        server.Catalog.Exports[0].Options.Access = Addresses("10.0.0.0/8");
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, "lan"u8);
        Assert.True(await client.WaitForCloseAsync());
    }

    [Fact]
    public async Task A_tls_identity_outside_the_allow_list_gets_policy()
    {
        await using var server = await TestServer.StartAsync(
            catalog => catalog.Add(new Export(new ExportOptions { Name = "mine", Access = new ExportAccess { Identities = ["client1"] } }, new MemoryBlockDevice(1 << 20))),
            fixture.Tls(TlsMode.On));
        var certificates = fixture.Certificates;
        var uri = $"nbds://localhost:{server.Port}/mine?tls-certificates=";
        var allowed = await PeerTool.RunAsync("nbdinfo", ["--size", uri + certificates.Directory]);
        Assert.True(allowed.ExitCode == 0, allowed.ToString());

        var other = await PeerTool.RunAsync("nbdinfo", ["--size", uri + certificates.SecondClientDirectory]);
        Assert.NotEqual(0, other.ExitCode);
        Assert.Contains("client2", await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "ErrorPolicy", "TLS identity allow list"), StringComparison.Ordinal);

        // Without TLS there is no identity at all.
        await using var plain = await RawNbdClient.ConnectAsync(server.EndPoint);
        await plain.StartAsync();
        var (type, message) = await GoAsync(plain, "mine");
        Assert.Equal(OptionReplyType.ErrorPolicy, type);
        Assert.Contains("no certificate", message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task One_connection_over_an_exports_limit_is_refused_until_one_leaves()
    {
        await using var server = await TestServer.StartAsync(
            catalog => catalog.Add(new Export(new ExportOptions { Name = "single", MaxConnections = 1 }, new MemoryBlockDevice(1 << 20))));
        var first = await RawNbdClient.ConnectAsync(server.EndPoint);
        await first.NegotiateAsync("single");

        await using (var second = await RawNbdClient.ConnectAsync(server.EndPoint))
        {
            await second.StartAsync();
            var (type, message) = await GoAsync(second, "single");
            Assert.Equal(OptionReplyType.ErrorPolicy, type);
            Assert.Contains("1 connections", message, StringComparison.Ordinal);

            // INFO is still answered: only entering transmission counts.
            await second.SendOptionAsync(NbdOption.Info, new InfoRequest("single", []).ToBytes());
            Assert.Equal(OptionReplyType.Ack, (await second.ReadOptionRepliesAsync(NbdOption.Info))[^1].Header.Type);
        }

        await first.SendRequestAsync(NbdCommand.Disconnect, 1, 0, 0);
        Assert.True(await first.WaitForCloseAsync());
        await first.DisposeAsync();

        for (var attempt = 0; attempt < 200; attempt++)
        {
            await using var third = await RawNbdClient.ConnectAsync(server.EndPoint);
            await third.StartAsync();
            if ((await GoAsync(third, "single")).Type == OptionReplyType.Ack)
            {
                return;
            }

            await Task.Delay(20);
        }

        Assert.Fail("the export's only connection slot was never given back");
    }

    [Fact]
    public async Task A_connection_over_the_server_limit_is_closed_at_once()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(1 << 20), configure: options => options.MaxConnections = 2);
        await using var one = await RawNbdClient.ConnectAsync(server.EndPoint);
        await one.StartAsync();
        await using var two = await RawNbdClient.ConnectAsync(server.EndPoint);
        await two.StartAsync();
        await using var three = await RawNbdClient.ConnectAsync(server.EndPoint);
        Assert.True(await three.WaitForCloseAsync());
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "refused, 2 connections is the limit");

        // The first two are unaffected.
        await one.SendOptionAsync(NbdOption.List);
        Assert.Equal(OptionReplyType.Ack, (await one.ReadOptionRepliesAsync(NbdOption.List))[^1].Header.Type);
    }

    [Fact]
    public async Task An_idle_connection_is_closed_and_a_busy_one_is_not()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(1 << 20), configure: options => options.IdleTimeout = TimeSpan.FromMilliseconds(400));
        await using var idle = await RawNbdClient.ConnectAsync(server.EndPoint);
        await idle.NegotiateAsync();
        await using var busy = await RawNbdClient.ConnectAsync(server.EndPoint);
        await busy.NegotiateAsync();

        var closed = idle.WaitForCloseAsync(TimeSpan.FromSeconds(10));
        for (var i = 0; i < 20; i++)
        {
            await busy.SendRequestAsync(NbdCommand.Flush, (ulong)i, 0, 0);
            Assert.Equal(NbdError.None, (await busy.ReadReplyAsync()).AnyError);
            await Task.Delay(50);
        }

        Assert.True(await closed);
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "idle for 0.4 s, closing");
    }

    [Fact]
    public async Task Bytes_in_flight_are_bounded_across_connections()
    {
        // Two connections, a 1 MiB server-wide budget: two 768 KiB writes cannot both be held at once, yet both
        // complete in turn (the bound throttles, it never deadlocks).
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(8 << 20), configure: options => options.MaxBytesInFlightTotal = 1 << 20);
        await using var a = await RawNbdClient.ConnectAsync(server.EndPoint);
        await a.NegotiateAsync();
        await using var b = await RawNbdClient.ConnectAsync(server.EndPoint);
        await b.NegotiateAsync();
        var data = Patterns.Generate(0, 768 << 10);
        await Task.WhenAll(
            Task.Run(async () =>
            {
                for (var i = 0; i < 4; i++)
                {
                    await a.SendRequestAsync(NbdCommand.Write, (ulong)i, (ulong)i * (768 << 10), 768 << 10, CommandFlags.None, data);
                    Assert.Equal(NbdError.None, (await a.ReadReplyAsync()).AnyError);
                }
            }),
            Task.Run(async () =>
            {
                for (var i = 0; i < 4; i++)
                {
                    await b.SendRequestAsync(NbdCommand.Write, (ulong)i, (ulong)(4 + i) * (768 << 10), 768 << 10, CommandFlags.None, data);
                    Assert.Equal(NbdError.None, (await b.ReadReplyAsync()).AnyError);
                }
            }));
    }

    [Fact]
    public void Configuration_keys_build_the_same_rules()
    {
        using var directory = new TempDirectory();
        File.WriteAllText(directory.File("authfile"), "# trusted hosts\n10.1.2.3\n192.168.0.0/16\n");
        var configuration = IniConfigurationReader.Parse($"""
            [generic]
                tls_certificates = {fixture.Certificates.Directory}
                tls_verify_peer = true
                idle_timeout = 300

            [a]
                exportname = /a
                authfile = {directory.File("authfile")}
                allow = unix
                allow_identities = client1, backup.example.com
                maxconnections = 3
                force_tls = true

            [b]
                exportname = /b
                authfile = {directory.File("missing")}
                tls = on
            """);
        configuration.LoadTls();
        Assert.NotNull(configuration.Server.Tls);
        Assert.True(configuration.Server.Tls!.RequireClientCertificate);
        Assert.Equal(TimeSpan.FromSeconds(300), configuration.Server.IdleTimeout);

        var a = configuration.Exports[0].Options;
        Assert.Equal(TlsMode.Require, a.Tls);
        Assert.Equal(3, a.MaxConnections);
        Assert.True(a.Access!.AllowUnix);
        Assert.Equal(["10.1.2.3/32", "192.168.0.0/16"], a.Access.Addresses!.Select(r => r.ToString()));
        Assert.Equal(["client1", "backup.example.com"], a.Access.Identities!);

        // nbd-server's rule: a missing authfile allows everyone.
        Assert.Null(configuration.Exports[1].Options.Access);
    }

    [Theory]
    [InlineData("10.0.0.0/8", "10.255.1.2", true)]
    [InlineData("10.0.0.0/8", "11.0.0.1", false)]
    [InlineData("10.0.0.0/8", "::ffff:10.1.1.1", true)]
    [InlineData("192.168.1.0/25", "192.168.1.127", true)]
    [InlineData("192.168.1.0/25", "192.168.1.128", false)]
    [InlineData("fd00::/8", "fd12::1", true)]
    [InlineData("fd00::/8", "fe80::1", false)]
    [InlineData("::1", "::1", true)]
    [InlineData("0.0.0.0/0", "8.8.8.8", true)]
    public void Address_rules_match_cidr_ranges(string rule, string address, bool matches)
    {
        Assert.True(AddressRule.TryParse(rule, out var parsed));
        Assert.Equal(matches, parsed!.Matches(System.Net.IPAddress.Parse(address)));
    }

    [Theory]
    [InlineData("10.0.0.0/33")]
    [InlineData("not-an-address")]
    [InlineData("10.0.0.0/-1")]
    public void Bad_address_rules_are_refused(string rule) => Assert.False(AddressRule.TryParse(rule, out _));
}
