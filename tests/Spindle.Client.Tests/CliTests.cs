using System.Text.Json;
using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary><c>spindle info</c>, <c>copy</c> and <c>dump</c> (the real binary) against Spindle's own server: every command and error path.</summary>
public sealed class CliTests
{
    private const int Size = 4 << 20;

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    /// <summary>A server with "disk" (4 MiB, data at 1 MiB and 3 MiB), "empty", "ro" (read-only, 1 MiB) and "small" (1 MiB).</summary>
    private static async Task<TestServer> StartAsync(Action<Spindle.Server.ServerOptions>? configure = null)
    {
        var server = await TestServer.StartAsync(catalog =>
        {
            catalog.Add(new Export(new ExportOptions { Name = "disk", Description = "the main disk" }, new MemoryBlockDevice(Size)));
            catalog.Add(new Export(new ExportOptions { Name = "empty" }, new MemoryBlockDevice(Size)));
            catalog.Add(new Export(new ExportOptions { Name = "ro", ReadOnly = true }, new MemoryBlockDevice(1 << 20)));
            catalog.Add(new Export(new ExportOptions { Name = "small" }, new MemoryBlockDevice(1 << 20)));
        }, configure);
        await using var client = await NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: Token);
        await client.WriteAsync(1 << 20, Patterns.Generate(1 << 20, 65536, seed: 1), Token);
        await client.WriteAsync(3 << 20, Patterns.Generate(3 << 20, 128 * 1024, seed: 1), Token);
        return server;
    }

    private static byte[] DiskContents()
    {
        var data = new byte[Size];
        Patterns.Generate(1 << 20, 65536, seed: 1).CopyTo(data, 1 << 20);
        Patterns.Generate(3 << 20, 128 * 1024, seed: 1).CopyTo(data, 3 << 20);
        return data;
    }

    private static void AssertExit(int expected, ProcessResult result) => Assert.True(result.ExitCode == expected, $"expected exit {expected}: {result}");

    // ---- info ----

    [Fact]
    public async Task Info_prints_size_flags_block_sizes_and_protocol()
    {
        await using var server = await StartAsync();
        var result = await SpindleCli.RunAsync("info", server.Uri("disk"));
        AssertExit(0, result);
        var text = result.StandardOutput;
        Assert.Contains("protocol: newstyle-fixed without TLS, extended headers (64-bit), entered with NBD_OPT_GO", text, StringComparison.Ordinal);
        Assert.Contains("export=\"disk\":", text, StringComparison.Ordinal);
        Assert.Contains("export-size: 4194304 (4.0 MiB)", text, StringComparison.Ordinal);
        Assert.Contains("description: the main disk", text, StringComparison.Ordinal);
        Assert.Contains($"uri: nbd://127.0.0.1:{server.Port}/disk", text, StringComparison.Ordinal);
        Assert.Contains("\t\tbase:allocation", text, StringComparison.Ordinal);
        Assert.Contains("is_read_only: false", text, StringComparison.Ordinal);
        Assert.Contains("can_flush: true", text, StringComparison.Ordinal);
        Assert.Contains("can_multi_conn: true", text, StringComparison.Ordinal);
        Assert.Contains("block_size_minimum: 1", text, StringComparison.Ordinal);
        Assert.Contains("block_size_maximum: 33554432", text, StringComparison.Ordinal);

        var unix = await SpindleCli.RunAsync("info", server.UnixUri("ro"));
        AssertExit(0, unix);
        Assert.Contains("is_read_only: true", unix.StandardOutput, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Info_json_is_machine_readable()
    {
        await using var server = await StartAsync();
        var result = await SpindleCli.RunAsync("info", "--json", server.Uri("disk"));
        AssertExit(0, result);
        using var json = JsonDocument.Parse(result.StandardOutput);
        var root = json.RootElement;

        // nbdinfo's keys (libnbd info/show.c), so jq filters written for nbdinfo read it unchanged.
        Assert.Equal("newstyle-fixed", root.GetProperty("protocol").GetString());
        Assert.True(root.GetProperty("structured").GetBoolean());
        Assert.False(root.GetProperty("TLS").GetBoolean());
        var export = Assert.Single(root.GetProperty("exports").EnumerateArray());
        Assert.Equal("disk", export.GetProperty("export-name").GetString());
        Assert.Equal(Size, export.GetProperty("export-size").GetInt64());
        Assert.True(export.GetProperty("can_trim").GetBoolean());
        Assert.Equal(4096, export.GetProperty("block_size_preferred").GetInt32());
        Assert.Equal("base:allocation", export.GetProperty("contexts")[0].GetString());

        // What nbdinfo does not show, under "spindle".
        Assert.Equal("go", export.GetProperty("spindle").GetProperty("method").GetString());
        Assert.Equal("base:allocation", export.GetProperty("spindle").GetProperty("meta_contexts")[0].GetString());
    }

    [Fact]
    public async Task Info_list_shows_every_export()
    {
        await using var server = await StartAsync();
        var text = await SpindleCli.RunAsync("info", "--list", server.Uri());
        AssertExit(0, text);
        Assert.Contains("4 exports", text.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("export=\"empty\":", text.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("description: the main disk", text.StandardOutput, StringComparison.Ordinal);
        Assert.Contains($"uri: nbd://127.0.0.1:{server.Port}/ro", text.StandardOutput, StringComparison.Ordinal);

        var json = await SpindleCli.RunAsync("info", "--list", "--json", server.Uri());
        AssertExit(0, json);
        using var document = JsonDocument.Parse(json.StandardOutput);
        var exports = document.RootElement.GetProperty("exports").EnumerateArray().ToList();
        Assert.Equal(["disk", "empty", "ro", "small"], exports.Select(e => e.GetProperty("export-name").GetString()).Order());
        Assert.True(exports.Single(e => e.GetProperty("export-name").GetString() == "ro").GetProperty("is_read_only").GetBoolean());
    }

    [Fact]
    public async Task Info_map_shows_data_and_holes()
    {
        await using var server = await StartAsync();
        var json = await SpindleCli.RunAsync("info", "--map", "--json", server.Uri("disk"));
        AssertExit(0, json);
        var runs = AllocationMap.FromSpindle(json.StandardOutput);
        Assert.Equal(
            [
                new AllocationRun(0, 1 << 20, true, true),
                new AllocationRun(1 << 20, 65536, false, false),
                new AllocationRun((1 << 20) + 65536, (2 << 20) - 65536, true, true),
                new AllocationRun(3 << 20, 128 * 1024, false, false),
                new AllocationRun((3 << 20) + (128 * 1024), (1 << 20) - (128 * 1024), true, true),
            ],
            runs);

        var text = await SpindleCli.RunAsync("info", "--map", server.Uri("disk"));
        AssertExit(0, text);
        var lines = text.StandardOutput.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(5, lines.Length);
        Assert.Equal(["0", "1048576", "3", "hole,zero"], lines[0].Split(' ', StringSplitOptions.RemoveEmptyEntries));
        Assert.Equal(["1048576", "65536", "0", "data"], lines[1].Split(' ', StringSplitOptions.RemoveEmptyEntries));
    }

    [Theory]
    [InlineData(2, "invalid NBD URI 'http://x/': unknown scheme 'http'", "info", "http://x/")]
    [InlineData(2, "no scheme", "info", "disk.img")]
    [InlineData(1, "does not offer TLS (NBD_OPT_STARTTLS answered NBD_REP_ERR_POLICY", "info", "nbds://127.0.0.1:PORT/")]
    [InlineData(1, "TLS certificate directory /nonexistent does not exist", "info", "nbds://127.0.0.1:PORT/?tls-certificates=/nonexistent")]
    [InlineData(1, "connection refused", "info", "nbd://127.0.0.1:PORT0/")]
    [InlineData(1, "has no export named 'nope'", "info", "nbd://127.0.0.1:PORT/nope")]
    [InlineData(2, "--list and --map cannot be combined", "info", "--list", "--map", "nbd://127.0.0.1:PORT/")]
    [InlineData(1, "did not agree to meta context 'qemu:dirty-bitmap:b'", "info", "--context", "qemu:dirty-bitmap:b", "nbd://127.0.0.1:PORT/disk")]
    [InlineData(2, "--offset 5000000 is beyond the end of the export (4194304 bytes)", "dump", "-o", "5000000", "nbd://127.0.0.1:PORT/disk")]
    [InlineData(2, "reaches past the end of the export", "dump", "-o", "4M", "-n", "1", "nbd://127.0.0.1:PORT/disk")]
    [InlineData(2, "--length: '12Q' is not a size", "dump", "-n", "12Q", "nbd://127.0.0.1:PORT/disk")]
    [InlineData(2, "source and destination are the same file", "copy", "same.img", "./same.img")]
    [InlineData(1, "source 'missing.img' does not exist", "copy", "missing.img", "out.img")]
    [InlineData(1, "destination directory", "copy", "nbd://127.0.0.1:PORT/disk", "/nonexistent/dir/out.img")]
    [InlineData(1, "the destination nbd://127.0.0.1:PORT/small (1048576 bytes) is smaller than the source nbd://127.0.0.1:PORT/disk (4194304 bytes)", "copy", "nbd://127.0.0.1:PORT/disk", "nbd://127.0.0.1:PORT/small")]
    [InlineData(1, "the destination export nbd://127.0.0.1:PORT/ro is read-only", "copy", "nbd://127.0.0.1:PORT/ro", "nbd://127.0.0.1:PORT/ro")]
    [InlineData(2, "--connections 0: give 1 to 64", "copy", "-C", "0", "a", "b")]
    [InlineData(2, "--sparse 1000: give 0 or a power of two", "copy", "-S", "1000", "a", "b")]
    [InlineData(2, "--request-size 100: give 512 bytes to 32M", "copy", "--request-size", "100", "a", "b")]
    public async Task Errors_are_reported_on_stderr_with_the_exit_code(int exitCode, string message, params string[] arguments)
    {
        await using var server = await StartAsync();
        var port = PeerServer.FreePort().ToString(System.Globalization.CultureInfo.InvariantCulture);
        var filled = arguments.Select(a => a.Replace("PORT0", port, StringComparison.Ordinal).Replace("PORT", server.Port.ToString(System.Globalization.CultureInfo.InvariantCulture), StringComparison.Ordinal)).ToArray();
        var result = await SpindleCli.RunAsync(filled);
        AssertExit(exitCode, result);
        Assert.StartsWith("spindle: error: ", result.StandardError, StringComparison.Ordinal);
        Assert.Contains(message.Replace("PORT", server.Port.ToString(System.Globalization.CultureInfo.InvariantCulture), StringComparison.Ordinal), result.StandardError, StringComparison.Ordinal);
        Assert.Empty(result.StandardOutput);
    }

    [Fact]
    public async Task Listing_a_server_that_refuses_it_fails_clearly()
    {
        await using var server = await StartAsync(options => options.AllowList = false);
        var result = await SpindleCli.RunAsync("info", "--list", server.Uri());
        AssertExit(1, result);
        Assert.Contains("does not allow listing its exports (NBD_REP_ERR_POLICY", result.StandardError, StringComparison.Ordinal);
    }

    // ---- dump ----

    [Theory]
    [InlineData(new string[0], new string[0])]
    [InlineData(new[] { "-v" }, new[] { "-v" })]
    [InlineData(new[] { "-o", "1048570", "-n", "100" }, new[] { "-s", "1048570", "-n", "100" })]
    [InlineData(new[] { "--offset", "3M", "--length", "129K" }, new[] { "-s", "3145728", "-n", "132096" })]
    [InlineData(new[] { "-o", "4194303" }, new[] { "-s", "4194303" })]
    public async Task Dump_is_byte_for_byte_hexdump_C(string[] dumpArguments, string[] hexdumpArguments)
    {
        await using var server = await StartAsync();
        using var directory = new TempDirectory();
        var file = directory.File("disk.img");
        await File.WriteAllBytesAsync(file, DiskContents(), Token);
        var dump = await SpindleCli.RunAsync(["dump", .. dumpArguments, server.Uri("disk")]);
        AssertExit(0, dump);
        var hexdump = await PeerTool.RunCheckedAsync("hexdump", ["-C", .. hexdumpArguments, file]);
        Assert.Equal(hexdump.StandardOutput, dump.StandardOutput);
    }

    [Fact]
    public async Task Dump_reads_aligned_blocks_from_an_export_with_a_minimum_block_size()
    {
        var device = new MemoryBlockDevice(1 << 20);
        await using var server = await TestServer.StartAsync(catalog =>
            catalog.Add(new Export(new ExportOptions { BlockSizes = new BlockSizeConstraints(4096, 4096, 65536) }, device)));
        await using (var client = await NbdClient.ConnectAsync(server.Uri(), cancellationToken: Token))
        {
            var data = Patterns.Generate(0, 1 << 20, seed: 6);
            for (var offset = 0; offset < data.Length; offset += 65536)
            {
                await client.WriteAsync(offset, data.AsMemory(offset, 65536), Token);
            }
        }

        using var directory = new TempDirectory();
        var file = directory.File("disk.img");
        await File.WriteAllBytesAsync(file, Patterns.Generate(0, 1 << 20, seed: 6), Token);
        var dump = await SpindleCli.RunAsync("dump", "-o", "70001", "-n", "70000", server.Uri());
        AssertExit(0, dump);
        var hexdump = await PeerTool.RunCheckedAsync("hexdump", ["-C", "-s", "70001", "-n", "70000", file]);
        Assert.Equal(hexdump.StandardOutput, dump.StandardOutput);
    }

    // ---- copy ----

    [Fact]
    public async Task Copy_round_trip_through_an_export_is_exact_and_sparse()
    {
        await using var server = await StartAsync();
        using var directory = new TempDirectory();
        var download = directory.File("download.img");
        var first = await SpindleCli.RunAsync("copy", server.Uri("disk"), download);
        AssertExit(0, first);
        Assert.Matches(@"^copied 4194304 bytes \(4\.0 MiB\) from nbd://127\.0\.0\.1:\d+/disk to .*download\.img in \d+\.\d{3} s, .*/s\n", first.StandardOutput);
        Assert.Contains("192.0 KiB written as data, 0 B zeroed, 3.8 MiB skipped (destination already zero)", first.StandardOutput, StringComparison.Ordinal);
        Assert.Equal(DiskContents(), await File.ReadAllBytesAsync(download, Token));
        Assert.Equal(192L * 1024, await NbdkitTests.AllocatedBytesAsync(download));

        var upload = await SpindleCli.RunAsync("copy", "--json", download, server.Uri("empty"));
        AssertExit(0, upload);
        using var json = JsonDocument.Parse(upload.StandardOutput);
        Assert.Equal(Size, json.RootElement.GetProperty("bytes").GetInt64());
        Assert.Equal(192 * 1024, json.RootElement.GetProperty("data_bytes").GetInt64());
        Assert.Equal("file", json.RootElement.GetProperty("source_info").GetProperty("kind").GetString());
        Assert.Equal("nbd", json.RootElement.GetProperty("destination_info").GetProperty("kind").GetString());
        Assert.True(json.RootElement.GetProperty("source_info").GetProperty("extents").GetBoolean());

        await using var client = await NbdClient.ConnectAsync(server.Uri("empty"), cancellationToken: Token);
        var back = new byte[Size];
        await client.ReadAsync(0, back, Token);
        Assert.Equal(DiskContents(), back);
    }

    [Fact]
    public async Task Copy_nbd_to_nbd_uses_multi_conn_and_zeroes_a_dirty_destination()
    {
        await using var server = await StartAsync();
        await using (var client = await NbdClient.ConnectAsync(server.Uri("empty"), cancellationToken: Token))
        {
            await client.WriteAsync(0, Enumerable.Repeat((byte)0x5a, Size).ToArray(), Token);
        }

        var copy = await SpindleCli.RunAsync("copy", "--json", "-C", "3", "-R", "8", server.Uri("disk"), server.UnixUri("empty"));
        AssertExit(0, copy);
        using var json = JsonDocument.Parse(copy.StandardOutput);
        Assert.Equal(3, json.RootElement.GetProperty("source_info").GetProperty("connections").GetInt32());
        Assert.Equal(24, json.RootElement.GetProperty("requests_in_flight").GetInt32());
        Assert.Equal(Size - (192 * 1024), json.RootElement.GetProperty("zeroed_bytes").GetInt64());

        await using var check = await NbdClient.ConnectAsync(server.Uri("empty"), cancellationToken: Token);
        var back = new byte[Size];
        await check.ReadAsync(0, back, Token);
        Assert.Equal(DiskContents(), back);
    }

    [Fact]
    public async Task Copy_options_change_how_but_not_what()
    {
        await using var server = await StartAsync();
        using var directory = new TempDirectory();

        var plain = directory.File("plain.img");
        var everything = await SpindleCli.RunAsync("copy", "--json", "--no-extents", "-S", "0", server.Uri("disk"), plain);
        AssertExit(0, everything);
        Assert.Contains($"\"data_bytes\": {Size}", everything.StandardOutput, StringComparison.Ordinal);
        Assert.Equal(DiskContents(), await File.ReadAllBytesAsync(plain, Token));

        var allocated = directory.File("allocated.img");
        var full = await SpindleCli.RunAsync("copy", "--allocated", "--request-size", "64K", server.Uri("disk"), allocated);
        AssertExit(0, full);
        Assert.Equal(DiskContents(), await File.ReadAllBytesAsync(allocated, Token));
        Assert.Equal((long)Size, await NbdkitTests.AllocatedBytesAsync(allocated));

        var trusting = await SpindleCli.RunAsync("copy", "--json", "--destination-is-zero", server.Uri("disk"), server.Uri("empty"));
        AssertExit(0, trusting);
        Assert.Contains($"\"skipped_bytes\": {Size - (192 * 1024)}", trusting.StandardOutput, StringComparison.Ordinal);
        Assert.Contains("\"zeroed_bytes\": 0", trusting.StandardOutput, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Copy_into_an_existing_larger_file_replaces_it()
    {
        await using var server = await StartAsync();
        using var directory = new TempDirectory();
        var target = directory.File("old.img");
        await File.WriteAllBytesAsync(target, Enumerable.Repeat((byte)0x42, 2 * Size).ToArray(), Token);
        var copy = await SpindleCli.RunAsync("copy", server.Uri("disk"), target);
        AssertExit(0, copy);
        Assert.Equal(DiskContents(), await File.ReadAllBytesAsync(target, Token));
    }

    [Fact]
    public async Task Copy_into_a_larger_export_warns_and_leaves_the_tail()
    {
        await using var server = await StartAsync();
        await using (var client = await NbdClient.ConnectAsync(server.Uri("empty"), cancellationToken: Token))
        {
            await client.WriteAsync(Size - 4096, Enumerable.Repeat((byte)0x42, 4096).ToArray(), Token);
        }

        var copy = await SpindleCli.RunAsync("copy", server.Uri("ro"), server.Uri("empty"));
        AssertExit(0, copy);
        Assert.Contains("spindle: warning: the destination is 3145728 bytes larger than the source", copy.StandardError, StringComparison.Ordinal);
        await using var check = await NbdClient.ConnectAsync(server.Uri("empty"), cancellationToken: Token);
        var tail = new byte[4096];
        await check.ReadAsync(Size - 4096, tail, Token);
        Assert.All(tail, b => Assert.Equal(0x42, b));
    }

    [Fact]
    public async Task Progress_bar_only_when_asked_or_on_a_terminal()
    {
        await using var server = await StartAsync();
        using var directory = new TempDirectory();
        var quiet = await SpindleCli.RunAsync("copy", "-q", server.Uri("disk"), directory.File("a.img"));
        AssertExit(0, quiet);
        Assert.Empty(quiet.StandardOutput);
        Assert.Empty(quiet.StandardError);

        // (Redirected output is read line by line, so the bar's carriage returns show up as line breaks.)
        var progress = await SpindleCli.RunAsync("copy", "-q", "--progress", server.Uri("disk"), directory.File("b.img"));
        AssertExit(0, progress);
        Assert.Contains("[########################################] 100.0%  4.0 MiB of 4.0 MiB", progress.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Copy_from_a_server_that_dies_mid_copy_fails_with_a_clear_error()
    {
        await using var source = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(64 << 20, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly, structured: false);
            for (var i = 0; i < 10; i++)
            {
                var (request, _) = await c.ReadRequestAsync();
                await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, Patterns.Generate((long)request.Offset, (int)request.Length));
            }

            c.Reset();
        });
        using var directory = new TempDirectory();
        var copy = await SpindleCli.RunAsync("copy", "-R", "4", "-C", "1", "--dead-timeout", "0", source.Uri(), directory.File("out.img"));
        AssertExit(1, copy);

        // The first failure reported is a READ in flight or one submitted just after the drop; both name the cause.
        Assert.Matches(@"^spindle: error: (READ offset \d+ length \d+ failed|no working connection to 127\.0\.0\.1:\d+): connection to 127\.0\.0\.1:\d+ lost", copy.StandardError);
    }

    [Fact]
    public async Task Copy_from_a_server_that_keeps_dropping_the_connection_completes_exactly()
    {
        const int CopySize = 16 << 20;
        await using var source = ScriptedNbdServer.Start(async c =>
        {
            await c.HandshakeAsync(CopySize, TransmissionFlags.HasFlags | TransmissionFlags.ReadOnly, structured: false);
            for (var i = 0; i < 10; i++)
            {
                var (request, _) = await c.ReadRequestAsync();
                await c.SendSimpleReplyAsync(request.Cookie, NbdError.None, Patterns.Generate((long)request.Offset, (int)request.Length));
            }

            // A reset with requests still in flight: they are sent again on the next connection.
            c.Reset();
        });
        using var directory = new TempDirectory();
        var output = directory.File("out.img");
        var copy = await SpindleCli.RunAsync("copy", "-R", "4", "-C", "1", "--no-progress", source.Uri(), output);
        AssertExit(0, copy);
        Assert.Contains("reconnected after", copy.StandardError, StringComparison.Ordinal);
        Assert.True(source.ConnectionCount > 2, $"only {source.ConnectionCount} connections");
        Assert.Equal(Patterns.Generate(0, CopySize), await File.ReadAllBytesAsync(output, Token));
    }
}
