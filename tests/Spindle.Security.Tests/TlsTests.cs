using System.Text.Json;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Server.Security;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Security.Tests;

/// <summary>NBD_OPT_STARTTLS, TLS modes and TLS-only exports, against raw clients and real peers.</summary>
public sealed class TlsTests(CertificateFixture fixture) : IClassFixture<CertificateFixture>
{
    private TestCertificates Certificates => fixture.Certificates;

    /// <summary>A server offering TLS with a plain export "open" and a TLS-only export "secret".</summary>
    private Task<TestServer> StartSelectiveAsync(Action<Server.ServerOptions>? more = null) =>
        TestServer.StartAsync(
            catalog =>
            {
                catalog.Add(new Export(new ExportOptions { Name = "open" }, new MemoryBlockDevice(1 << 20)));
                catalog.Add(new Export(new ExportOptions { Name = "secret", Tls = TlsMode.Require, Description = "the secret disk" }, new MemoryBlockDevice(7 << 20)));
            },
            options =>
            {
                fixture.Tls(TlsMode.On)(options);
                more?.Invoke(options);
            });

    [Fact]
    public async Task A_plaintext_client_learns_nothing_about_a_tls_only_export()
    {
        await using var server = await StartSelectiveAsync();
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.StartAsync();

        // Not listed...
        await client.SendOptionAsync(NbdOption.List);
        var names = (await client.ReadOptionRepliesAsync(NbdOption.List)).SkipLast(1)
            .Select(r => ServerReply.TryParse(r.Data, out var name, out _) ? name : "?").ToList();
        Assert.Equal(["open"], names.Where(n => !n.StartsWith("by-", StringComparison.Ordinal)));
        Assert.DoesNotContain(server.Catalog.Exports.Single(e => e.Name == "secret").Uuid.ToString("D"), string.Concat(names));

        // ...no size or flags: ERR_TLS_REQD with no NBD_REP_INFO before it, exactly like a name that does not exist.
        foreach (var option in new[] { NbdOption.Info, NbdOption.Go })
        {
            foreach (var name in new[] { "secret", "no-such-export" })
            {
                await client.SendOptionAsync(option, new InfoRequest(name, [InfoType.Name, InfoType.Description, InfoType.BlockSize]).ToBytes());
                var replies = await client.ReadOptionRepliesAsync(option);
                var reply = Assert.Single(replies);
                Assert.Equal(OptionReplyType.ErrorTlsRequired, reply.Header.Type);
                Assert.DoesNotContain("7340032", System.Text.Encoding.UTF8.GetString(reply.Data), StringComparison.Ordinal);
            }
        }

        // Metadata-context options may not answer ERR_TLS_REQD: the export is simply unknown there.
        await client.SendOptionAsync(NbdOption.StructuredReply);
        await client.ReadOptionReplyAsync();
        await client.SendOptionAsync(NbdOption.ListMetaContext, new MetaContextRequest("secret", []).ToBytes());
        Assert.Equal(OptionReplyType.ErrorUnknown, Assert.Single(await client.ReadOptionRepliesAsync(NbdOption.ListMetaContext)).Header.Type);

        // The plain export still works without TLS.
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("open", []).ToBytes());
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionRepliesAsync(NbdOption.Go))[^1].Header.Type);
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "127.0.0.1", "needs TLS");
    }

    [Fact]
    public async Task Export_name_for_a_tls_only_export_before_tls_closes_the_connection()
    {
        await using var server = await StartSelectiveAsync();
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.ExportName, "secret"u8);
        Assert.True(await client.WaitForCloseAsync());
    }

    [Fact]
    public async Task After_starttls_the_tls_only_export_is_listed_and_served()
    {
        await using var server = await StartSelectiveAsync();
        await using var client = await TlsClient.ConnectAsync(server, Certificates, Certificates.Directory);
        await client.SendOptionAsync(NbdOption.List);
        var names = (await client.ReadOptionRepliesAsync(NbdOption.List)).SkipLast(1)
            .Select(r => ServerReply.TryParse(r.Data, out var name, out _) ? name : "?").Where(n => !n.StartsWith("by-", StringComparison.Ordinal)).Order().ToList();
        Assert.Equal(["open", "secret"], names);

        var (size, _) = await client.NegotiateAsync("secret", start: false);
        Assert.Equal(7ul << 20, size);
        var data = Patterns.Generate(0, 65536);
        await client.SendRequestAsync(NbdCommand.Write, 1, 0, 65536, CommandFlags.Fua, data);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        await client.SendRequestAsync(NbdCommand.Read, 2, 0, 65536);
        Assert.Equal(data, RawNbdClient.Reassemble(await client.ReadStructuredReplyAsync(2), 0, 65536));
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "TLS started", "client1");
    }

    [Fact]
    public async Task Starttls_forgets_what_was_negotiated_in_plain_text()
    {
        // CVE-2021-3716: structured replies injected before STARTTLS must not survive into the TLS session.
        await using var server = await StartSelectiveAsync();
        await using var client = await TlsClient.ConnectAsync(server, Certificates, Certificates.Directory, async plain =>
        {
            await plain.SendOptionAsync(NbdOption.StructuredReply);
            Assert.Equal(OptionReplyType.Ack, (await plain.ReadOptionReplyAsync()).Header.Type);
        });

        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("secret", []).ToBytes());
        var go = await client.ReadOptionRepliesAsync(NbdOption.Go);
        Assert.True(InfoReplies.TryReadExport(go[0].Data, out _, out var flags));
        Assert.False(flags.HasFlag(TransmissionFlags.SendDf)); // DF is only advertised with structured replies

        await client.SendRequestAsync(NbdCommand.Read, 1, 0, 512);
        Assert.False((await client.ReadReplyAsync(512)).IsStructured);
    }

    [Fact]
    public async Task Starttls_forgets_extended_headers_negotiated_in_plain_text()
    {
        // The extension: STARTTLS resets extended headers like every other negotiated state.
        await using var server = await StartSelectiveAsync();
        await using var client = await TlsClient.ConnectAsync(server, Certificates, Certificates.Directory, async plain =>
        {
            await plain.SendOptionAsync(NbdOption.ExtendedHeaders);
            Assert.Equal(OptionReplyType.Ack, (await plain.ReadOptionReplyAsync()).Header.Type);
        });

        // Over TLS a STRUCTURED_REPLY is accepted again (it would get ERR_EXT_HEADER_REQD if the plain-text
        // negotiation had survived), GO carries no BLOCK_STATUS_PAYLOAD, and requests are compact.
        await client.SendOptionAsync(NbdOption.StructuredReply);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("secret", []).ToBytes());
        var go = await client.ReadOptionRepliesAsync(NbdOption.Go);
        Assert.True(InfoReplies.TryReadExport(go[0].Data, out _, out var flags));
        Assert.False(flags.HasFlag(TransmissionFlags.BlockStatusPayload));
        await client.SendRequestAsync(NbdCommand.Flush, 1, 0, 0);
        Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
    }

    [Fact]
    public async Task A_second_starttls_is_invalid()
    {
        await using var server = await StartSelectiveAsync();
        await using var client = await TlsClient.ConnectAsync(server, Certificates, Certificates.Directory);
        await client.SendOptionAsync(NbdOption.StartTls);
        Assert.Equal(OptionReplyType.ErrorInvalid, (await client.ReadOptionReplyAsync()).Header.Type);
    }

    [Fact]
    public async Task Forced_tls_refuses_everything_but_starttls_and_abort()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(1 << 20), configure: fixture.Tls(TlsMode.Require));
        await using (var client = await RawNbdClient.ConnectAsync(server.EndPoint))
        {
            await client.StartAsync();
            foreach (var option in new[] { NbdOption.List, NbdOption.StructuredReply, NbdOption.Info, NbdOption.Go, (NbdOption)0x4444 })
            {
                var data = option is NbdOption.Info or NbdOption.Go ? new InfoRequest("", []).ToBytes() : [];
                await client.SendOptionAsync(option, data);
                var (header, _) = await client.ReadOptionReplyAsync();
                Assert.Equal((option, OptionReplyType.ErrorTlsRequired), (header.Option, header.Type));
            }

            await client.SendOptionAsync(NbdOption.Abort);
            Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);
        }

        await using (var client = await RawNbdClient.ConnectAsync(server.EndPoint))
        {
            await client.StartAsync();
            await client.SendOptionAsync(NbdOption.ExportName, []);
            Assert.True(await client.WaitForCloseAsync());
        }

        await using (var client = await TlsClient.ConnectAsync(server, Certificates, Certificates.Directory))
        {
            await client.NegotiateAsync("", start: false);
            await client.SendRequestAsync(NbdCommand.Flush, 1, 0, 0);
            Assert.Equal(NbdError.None, (await client.ReadReplyAsync()).AnyError);
        }
    }

    [Fact]
    public async Task A_client_without_fixed_newstyle_cannot_start_tls()
    {
        await using var server = await StartSelectiveAsync();
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.ReadGreetingAsync();
        await client.SendClientFlagsAsync(ClientFlags.NoZeroes);
        await client.SendOptionAsync(NbdOption.StartTls);
        Assert.Equal(OptionReplyType.ErrorPolicy, (await client.ReadOptionReplyAsync()).Header.Type);
    }

    [Fact]
    public async Task Nbdinfo_and_nbdcopy_over_nbds_uris()
    {
        await using var server = await StartSelectiveAsync();
        var uri = $"nbds://localhost:{server.Port}/secret?tls-certificates={Certificates.Directory}";
        var info = await PeerTool.RunCheckedAsync("nbdinfo", ["--json", uri]);
        using (var json = JsonDocument.Parse(info.StandardOutput))
        {
            Assert.True(json.RootElement.GetProperty("TLS").GetBoolean());
            Assert.Equal(7L << 20, json.RootElement.GetProperty("exports")[0].GetProperty("export-size").GetInt64());
        }

        var list = await PeerTool.RunCheckedAsync("nbdinfo", ["--list", uri]);
        Assert.Contains("the secret disk", list.StandardOutput, StringComparison.Ordinal);

        using var directory = new TempDirectory();
        var source = directory.File("source.img");
        await File.WriteAllBytesAsync(source, Patterns.Random(7 << 20, seed: 5));
        await PeerTool.RunCheckedAsync("nbdcopy", [source, uri]);
        var back = directory.File("back.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [uri, back]);
        Assert.Equal(await File.ReadAllBytesAsync(source), await File.ReadAllBytesAsync(back));

        // The same client without TLS is turned away.
        var plain = await PeerTool.RunAsync("nbdinfo", [$"nbd://localhost:{server.Port}/secret"]);
        Assert.NotEqual(0, plain.ExitCode);
    }

    [Fact]
    public async Task Qemu_img_and_qemu_io_with_tls_creds_x509()
    {
        await using var server = await StartSelectiveAsync();
        var creds = $"tls-creds-x509,id=tls0,dir={Certificates.Directory},endpoint=client";
        var image = $"driver=nbd,host=localhost,port={server.Port},export=secret,tls-creds=tls0";
        var info = await PeerTool.RunCheckedAsync("qemu-img", ["info", "--output=json", "--object", creds, "--image-opts", image]);
        using (var json = JsonDocument.Parse(info.StandardOutput))
        {
            Assert.Equal(7L << 20, json.RootElement.GetProperty("virtual-size").GetInt64());
        }

        var io = await PeerTool.RunCheckedAsync("qemu-io", ["--object", creds, "--image-opts", image, "-c", "write -P 0x77 1M 64k", "-c", "read -P 0x77 1M 64k", "-c", "write -z 2M 64k", "-c", "flush"]);
        Assert.DoesNotContain("failed", io.StandardOutput + io.StandardError, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public async Task Required_client_certificates_from_the_wrong_ca_or_none_are_refused()
    {
        await using var server = await TestServer.StartAsync(new MemoryBlockDevice(1 << 20), configure: fixture.Tls(TlsMode.Require, requireClientCertificate: true));
        var good = await PeerTool.RunAsync("nbdinfo", ["--size", $"nbds://localhost:{server.Port}/?tls-certificates={Certificates.Directory}"]);
        Assert.True(good.ExitCode == 0, good.ToString());

        var wrongCa = await PeerTool.RunAsync("nbdinfo", ["--size", $"nbds://localhost:{server.Port}/?tls-certificates={Certificates.WrongCaDirectory}"]);
        Assert.NotEqual(0, wrongCa.ExitCode);
        var none = await PeerTool.RunAsync("nbdinfo", ["--size", $"nbds://localhost:{server.Port}/?tls-certificates={Certificates.CaOnlyDirectory}"]);
        Assert.NotEqual(0, none.ExitCode);
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "TLS handshake failed");
    }

    [Fact]
    public async Task A_stalled_tls_handshake_is_dropped_at_the_timeout()
    {
        await using var server = await StartSelectiveAsync(options => options.HandshakeTimeout = TimeSpan.FromMilliseconds(500));
        await using var client = await RawNbdClient.ConnectAsync(server.EndPoint);
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StartTls);
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionReplyAsync()).Header.Type);

        // Half a ClientHello, then silence.
        await client.SendRawAsync([0x16, 0x03, 0x01, 0x02]);
        Assert.True(await client.WaitForCloseAsync(TimeSpan.FromSeconds(10)));
        await server.Logs.WaitForAsync(TimeSpan.FromSeconds(5), "handshake not finished");
    }

    [Fact]
    public async Task Spindle_serve_with_tls_certificates_from_the_command_line()
    {
        using var directory = new TempDirectory();
        var spindle = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo(SpindleExecutable.Path)
        {
            ArgumentList = { "serve", "--memory", "3M", "--bind", "127.0.0.1", "--port", "0", "--print-uri", "--tls-certificates", Certificates.Directory, "--tls", "require" },
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        })!;
        try
        {
            var uri = await spindle.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30));
            var port = new Uri(uri!).Port;
            var size = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", $"nbds://localhost:{port}/?tls-certificates={Certificates.Directory}"]);
            Assert.Equal("3145728", size.StandardOutput.Trim());
            var plain = await PeerTool.RunAsync("nbdinfo", ["--size", $"nbd://localhost:{port}/"]);
            Assert.NotEqual(0, plain.ExitCode);
        }
        finally
        {
            spindle.Kill(entireProcessTree: true);
            await spindle.WaitForExitAsync();
        }

        var missing = await PeerTool.RunAsync(SpindleExecutable.Path, ["serve", "--memory", "1M", "--tls-certificates", directory.Path]);
        Assert.Equal(2, missing.ExitCode);
        Assert.Contains("server-cert.pem does not exist", missing.StandardError, StringComparison.Ordinal);
    }
}
