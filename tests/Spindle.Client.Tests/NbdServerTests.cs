using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>
/// The client and the tools against Debian's nbd-server 3.24, the reference server.
/// </summary>
/// <remarks>
/// Quirks of this version the client copes with, each exercised here:
/// <list type="bullet">
/// <item>no structured replies (they came in 3.25): simple replies only, so no block status and no DF;</item>
/// <item>NBD_OPT_INFO reports size 0 until an export is opened: listing checks such sizes again with NBD_OPT_GO;</item>
/// <item>NBD_OPT_ABORT gets no ACK, the server just closes: leaving after a listing tolerates that;</item>
/// <item>NBD_INFO_BLOCK_SIZE is never sent: the client falls back to the spec's defaults;</item>
/// <item>it daemonizes and forks per client, so the tests stop it through its pid file.</item>
/// </list>
/// </remarks>
public sealed class NbdServerTests
{
    private static CancellationToken Token => TestContext.Current.CancellationToken;

    private static async Task<(PeerServer Server, string DiskPath)> StartAsync(TempDirectory directory, long size = 16 << 20)
    {
        var disk = directory.CreateSparseFile("disk.img", size);
        var golden = directory.CreateSparseFile("golden.img", 4 << 20);
        await File.WriteAllBytesAsync(golden, Patterns.Generate(0, 4 << 20, seed: 21), Token);
        var server = await PeerServer.StartNbdServerAsync(new Dictionary<string, string[]>
        {
            ["disk"] = [$"exportname = {disk}", "flush = true", "fua = true", "trim = true"],
            ["golden"] = [$"exportname = {golden}", "readonly = true"],
        });
        return (server, disk);
    }

    [Fact]
    public async Task Reads_and_writes_with_simple_replies_and_the_file_holds_them()
    {
        using var directory = new TempDirectory();
        var (server, disk) = await StartAsync(directory);
        await using (server)
        {
            var options = new NbdClientOptions { Connections = 2 };
            await using (var client = await NbdClient.ConnectAsync(server.Uri("disk"), options, Token))
            {
                Assert.Equal(16 << 20, client.Size);
                Assert.Equal(NegotiationMethod.Go, client.Export.Method);
                Assert.False(client.Export.StructuredReplies);
                Assert.False(client.Export.CanBlockStatus);
                Assert.Null(client.Export.AdvertisedBlockSizes);
                Assert.Equal(NbdLimits.DefaultMaxPayload, client.Export.MaximumPayload);
                Assert.True(client.Export.CanFlush && client.Export.CanFua && client.Export.CanTrim && client.Export.CanWriteZeroes);
                Assert.True(client.Export.CanMultiConn);
                Assert.Equal(2, client.ConnectionCount);

                var writes = Enumerable.Range(0, 64).Select(i =>
                    client.WriteAsync(i * 65536L, Patterns.Generate(i * 65536L, 65536, seed: 8), i % 8 == 0 ? CommandFlags.Fua : CommandFlags.None, Token).AsTask());
                await Task.WhenAll(writes);
                await client.WriteZeroesAsync(65536, 65536, CommandFlags.NoHole, Token);
                await client.WriteZeroesAsync(3 * 65536, 65536, cancellationToken: Token);
                await client.TrimAsync(8 << 20, 1 << 20, cancellationToken: Token);
                await client.FlushAsync(Token);

                var back = new byte[4 << 20];
                await client.ReadAsync(0, back, Token);
                var expected = Patterns.Generate(0, 4 << 20, seed: 8);
                Array.Clear(expected, 65536, 65536);
                Array.Clear(expected, 3 * 65536, 65536);
                Assert.Equal(expected, back);
            }

            var onDisk = new byte[4 << 20];
            await using (var file = File.OpenRead(disk))
            {
                await file.ReadExactlyAsync(onDisk, Token);
            }

            var written = Patterns.Generate(0, 4 << 20, seed: 8);
            Array.Clear(written, 65536, 65536);
            Array.Clear(written, 3 * 65536, 65536);
            Assert.Equal(written, onDisk);
        }
    }

    [Fact]
    public async Task Listing_shows_real_sizes_although_info_says_zero()
    {
        using var directory = new TempDirectory();
        var (server, _) = await StartAsync(directory);
        await using (server)
        {
            var listings = await NbdClient.ListExportsAsync(NbdUri.Parse(server.Uri()), cancellationToken: Token);
            Assert.Equal(["disk", "golden"], listings.Select(l => l.Name).Order());
            Assert.Equal(16 << 20, listings.Single(l => l.Name == "disk").Info!.Size);
            var golden = listings.Single(l => l.Name == "golden").Info!;
            Assert.Equal(4 << 20, golden.Size);
            Assert.True(golden.IsReadOnly);

            var text = await SpindleCli.RunAsync("info", "--list", server.Uri());
            Assert.True(text.ExitCode == 0, text.ToString());
            Assert.Contains("export=\"disk\":", text.StandardOutput, StringComparison.Ordinal);
            Assert.Contains("export-size: 16777216 (16.0 MiB)", text.StandardOutput, StringComparison.Ordinal);
            Assert.Contains("export-size: 4194304 (4.0 MiB)", text.StandardOutput, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task Read_only_and_unknown_exports_are_refused_clearly()
    {
        using var directory = new TempDirectory();
        var (server, _) = await StartAsync(directory);
        await using (server)
        {
            await using (var golden = await NbdClient.ConnectAsync(server.Uri("golden"), cancellationToken: Token))
            {
                Assert.True(golden.Export.IsReadOnly);
                await Assert.ThrowsAsync<NotSupportedException>(() => golden.WriteAsync(0, new byte[512], Token).AsTask());
                var back = new byte[1 << 20];
                await golden.ReadAsync(1 << 20, back, Token);
                Assert.Equal(Patterns.Generate(0, 4 << 20, seed: 21).AsSpan(1 << 20, 1 << 20).ToArray(), back);
            }

            var missing = await Assert.ThrowsAsync<NbdOptionException>(() => NbdClient.ConnectAsync(server.Uri("nope"), cancellationToken: Token));
            Assert.Contains("has no export named 'nope'", missing.Message, StringComparison.Ordinal);

            var copy = await SpindleCli.RunAsync("copy", server.Uri("disk"), server.Uri("golden"));
            Assert.Equal(1, copy.ExitCode);
            Assert.Contains("spindle: error: the destination export", copy.StandardError, StringComparison.Ordinal);
            Assert.Contains("is read-only", copy.StandardError, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task Copy_through_nbd_server_is_exact()
    {
        using var directory = new TempDirectory();
        var (server, _) = await StartAsync(directory);
        await using (server)
        {
            var source = directory.File("source.img");
            var data = Patterns.Random(16 << 20, seed: 77);
            Array.Clear(data, 4 << 20, 4 << 20);
            await File.WriteAllBytesAsync(source, data, Token);

            var upload = await SpindleCli.RunAsync("copy", "--json", source, server.Uri("disk"));
            Assert.True(upload.ExitCode == 0, upload.ToString());

            // Zero detection found the 4 MiB of zeroes; nbd-server got WRITE_ZEROES for them, not data.
            Assert.Contains("\"zeroed_bytes\": 4194304", upload.StandardOutput, StringComparison.Ordinal);

            var back = directory.File("back.img");
            var download = await SpindleCli.RunAsync("copy", server.Uri("disk"), back);
            Assert.True(download.ExitCode == 0, download.ToString());
            await PeerTool.RunCheckedAsync("cmp", [source, back]);
            Assert.Equal(12L << 20, await NbdkitTests.AllocatedBytesAsync(back));

            var info = await SpindleCli.RunAsync("info", "--json", server.Uri("disk"));
            Assert.True(info.ExitCode == 0, info.ToString());
            Assert.Contains("\"structured\": false", info.StandardOutput, StringComparison.Ordinal);

            var map = await SpindleCli.RunAsync("info", "--map", server.Uri("disk"));
            Assert.Equal(1, map.ExitCode);
            Assert.Contains("block status is not available", map.StandardError, StringComparison.Ordinal);
        }
    }
}
