using Spindle.Protocol;
using Spindle.Testing;
using Xunit;

namespace Spindle.Client.Tests;

/// <summary>The client and the tools against real nbdkit: memory and file plugins, and nbdkit playing older servers.</summary>
public sealed class NbdkitTests
{
    private static CancellationToken Token => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Memory_plugin_with_multi_conn_keeps_every_byte_of_many_parallel_requests()
    {
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["memory", "32M"]);
        var options = new NbdClientOptions { Connections = 4, MaxRequestsInFlight = 32 };
        await using var client = await NbdClient.ConnectAsync(nbdkit.Uri(), options, Token);
        Assert.Equal(32 << 20, client.Size);
        Assert.True(client.Export.StructuredReplies);
        Assert.True(client.Export.CanMultiConn);
        Assert.Equal(4, client.ConnectionCount);
        Assert.True(client.Export.CanBlockStatus && client.Export.CanFastZero && client.Export.CanCache && client.Export.CanDontFragment);

        const int Block = 65536;
        var count = (int)(client.Size / Block);
        await Task.WhenAll(Enumerable.Range(0, count).Select(i =>
            client.WriteAsync((long)i * Block, Patterns.Generate((long)i * Block, Block, seed: 11), Token).AsTask()));
        await client.FlushAsync(Token);
        var buffers = Enumerable.Range(0, count).Select(_ => new byte[Block]).ToArray();
        await Task.WhenAll(buffers.Select((b, i) => client.ReadAsync((long)i * Block, b, Token).AsTask()));
        for (var i = 0; i < count; i++)
        {
            Assert.Equal(Patterns.Generate((long)i * Block, Block, seed: 11), buffers[i]);
        }

        // Zeroes and trims, then block status sees them.
        await client.WriteZeroesAsync(0, 1 << 20, CommandFlags.FastZero, Token);
        await client.TrimAsync(4 << 20, 1 << 20, cancellationToken: Token);
        await client.WriteZeroesAsync(8 << 20, 1 << 20, CommandFlags.NoHole | CommandFlags.Fua, Token);
        await client.CacheAsync(0, 1 << 20, Token);
        var first = new byte[1 << 20];
        await client.ReadAsync(0, first, Token);
        Assert.All(first, b => Assert.Equal(0, b));
        var status = await client.GetBlockStatusAsync(0, 2 << 20, cancellationToken: Token);
        Assert.True(status.Extents[0].IsZero, $"expected zeroes at 0, got {status.Extents[0].AllocationDescription}");
        Assert.Equal(1 << 20, status.Extents[0].Length);
        Assert.False(status.Extents[1].IsZero);
    }

    [Fact]
    public async Task File_plugin_over_a_unix_socket_writes_what_the_file_then_holds()
    {
        using var directory = new TempDirectory();
        var path = directory.CreateSparseFile("disk.img", 16 << 20);
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["file", path], unix: true);
        await using (var client = await NbdClient.ConnectAsync(nbdkit.Uri(), cancellationToken: Token))
        {
            Assert.Equal(16 << 20, client.Size);
            await client.WriteAsync(1 << 20, Patterns.Generate(1 << 20, 3 << 20, seed: 5), CommandFlags.Fua, Token);
            await client.WriteZeroesAsync(2 << 20, 65536, cancellationToken: Token);
            await client.FlushAsync(Token);

            // The file plugin reports the file's holes through base:allocation.
            var extents = new List<NbdExtent>();
            await foreach (var extent in client.GetExtentsAsync(0, client.Size, cancellationToken: Token))
            {
                extents.Add(extent);
            }

            Assert.True(extents[0].IsHole && extents[0].IsZero && extents[0].End == 1 << 20, string.Join(", ", extents));
            Assert.Contains(extents, e => !e.IsHole && e.Offset <= 1 << 20 && e.End > 1 << 20);
            Assert.True(extents[^1].IsHole);
        }

        var expected = Patterns.Generate(1 << 20, 3 << 20, seed: 5);
        Array.Clear(expected, 1 << 20, 65536);
        var onDisk = new byte[3 << 20];
        await using (var file = File.OpenRead(path))
        {
            file.Seek(1 << 20, SeekOrigin.Begin);
            await file.ReadExactlyAsync(onDisk, Token);
        }

        Assert.Equal(expected, onDisk);
    }

    [Fact]
    public async Task No_structured_replies_stands_in_for_an_old_server()
    {
        await using var nbdkit = await PeerServer.StartNbdkitAsync(["--no-sr", "memory", "8M"]);
        await using var client = await NbdClient.ConnectAsync(nbdkit.Uri(), cancellationToken: Token);
        Assert.False(client.Export.StructuredReplies);
        Assert.False(client.Export.CanBlockStatus);
        Assert.False(client.Export.CanDontFragment);
        var data = Patterns.Generate(0, 3 << 20, seed: 9);
        await client.WriteAsync(0, data, Token);
        var back = new byte[data.Length];
        await client.ReadAsync(0, back, Token);
        Assert.Equal(data, back);
        await Assert.ThrowsAsync<NotSupportedException>(() => client.GetBlockStatusAsync(0, 4096, cancellationToken: Token));
        await Assert.ThrowsAsync<NotSupportedException>(() => client.ReadAsync(0, new byte[512], CommandFlags.DontFragment, Token).AsTask());
    }

    [Fact]
    public async Task Structured_replies_without_meta_contexts_leave_block_status_off()
    {
        // nbdkit 1.34+ has --no-mc for this; Debian's 1.32 does not, so the same situation is made by asking for a
        // context nbdkit does not have: structured replies on, no context selected.
        var help = await PeerTool.RunAsync("nbdkit", ["--help"]);
        var hasNoMc = (help.StandardOutput + help.StandardError).Contains("--no-mc", StringComparison.Ordinal);
        await using var nbdkit = await PeerServer.StartNbdkitAsync(hasNoMc ? ["--no-mc", "memory", "8M"] : ["memory", "8M"]);
        var options = new NbdClientOptions();
        if (!hasNoMc)
        {
            options.MetaContexts.Clear();
            options.MetaContexts.Add("qemu:allocation-depth");
        }

        await using var client = await NbdClient.ConnectAsync(nbdkit.Uri(), options, Token);
        Assert.True(client.Export.StructuredReplies);
        Assert.Empty(client.Export.MetaContexts);
        Assert.False(client.Export.CanBlockStatus);
        await client.WriteAsync(0, Patterns.Generate(0, 4096), Token);
        var back = new byte[4096];
        await client.ReadAsync(0, back, Token);
        Assert.Equal(Patterns.Generate(0, 4096), back);
    }

    [Fact]
    public async Task Advertised_block_sizes_are_obeyed()
    {
        // The blocksize-policy filter advertises (512, 4096, 64 KiB) and errors anything outside them.
        await using var nbdkit = await PeerServer.StartNbdkitAsync([
            "--filter=blocksize-policy", "memory", "8M",
            "blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=65536", "blocksize-error-policy=error",
        ]);
        await using var client = await NbdClient.ConnectAsync(nbdkit.Uri(), cancellationToken: Token);
        Assert.Equal(new BlockSizeConstraints(512, 4096, 65536), client.Export.AdvertisedBlockSizes);
        Assert.Equal(65536, client.Export.MaximumPayload);
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => client.WriteAsync(0, new byte[131072], Token).AsTask());
        await Assert.ThrowsAsync<ArgumentException>(() => client.WriteAsync(100, new byte[512], Token).AsTask());
        await client.WriteAsync(512, Patterns.Generate(512, 65536), Token);
        var back = new byte[65536];
        await client.ReadAsync(512, back, Token);
        Assert.Equal(Patterns.Generate(512, 65536), back);

        // A long zero goes out as one request: WRITE_ZEROES is not bound by the maximum payload.
        await client.WriteZeroesAsync(0, 4 << 20, cancellationToken: Token);
    }

    [Fact]
    public async Task Copy_between_nbdkit_and_files_is_exact_and_keeps_holes()
    {
        using var directory = new TempDirectory();
        var source = directory.CreateSparseFile("source.img", 24 << 20);
        await using (var file = new FileStream(source, FileMode.Open, FileAccess.Write))
        {
            foreach (var offset in new long[] { 0, 5 << 20, 17 << 20 })
            {
                file.Seek(offset, SeekOrigin.Begin);
                await file.WriteAsync(Patterns.Generate(offset, 1 << 20, seed: 2), Token);
            }
        }

        await using var nbdkit = await PeerServer.StartNbdkitAsync(["memory", "24M"]);
        var upload = await SpindleCli.RunAsync("copy", "--json", source, nbdkit.Uri());
        Assert.True(upload.ExitCode == 0, upload.ToString());
        Assert.Contains("\"data_bytes\": 3145728", upload.StandardOutput, StringComparison.Ordinal);

        var map = await PeerTool.RunCheckedAsync("nbdinfo", ["--map", nbdkit.Uri()]);
        Assert.Contains("hole,zero", map.StandardOutput, StringComparison.Ordinal);

        var back = directory.File("back.img");
        var download = await SpindleCli.RunAsync("copy", nbdkit.Uri(), back);
        Assert.True(download.ExitCode == 0, download.ToString());
        await PeerTool.RunCheckedAsync("cmp", [source, back]);
        await PeerTool.RunCheckedAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, back]);

        // Only the 3 MiB of data were written: the rest of the new file is holes.
        Assert.Equal(3L << 20, await AllocatedBytesAsync(back));
    }

    [Fact]
    public async Task Copy_nbd_to_nbd_with_multi_conn_on_both_sides()
    {
        await using var source = await PeerServer.StartNbdkitAsync(["memory", "16M"]);
        await using var destination = await PeerServer.StartNbdkitAsync(["memory", "16M"], unix: true);
        await using (var client = await NbdClient.ConnectAsync(source.Uri(), cancellationToken: Token))
        {
            await client.WriteAsync(3 << 20, Patterns.Generate(3 << 20, 5 << 20, seed: 4), Token);
        }

        var copy = await SpindleCli.RunAsync("copy", "--json", "-C", "4", source.Uri(), destination.Uri());
        Assert.True(copy.ExitCode == 0, copy.ToString());
        Assert.Contains("\"connections\": 4", copy.StandardOutput, StringComparison.Ordinal);
        await PeerTool.RunCheckedAsync("qemu-img", ["compare", "-f", "raw", "-F", "raw", source.Uri(), destination.Uri()]);
    }

    /// <summary>Bytes of a file that are allocated on disk (SEEK_DATA runs), from qemu-img map.</summary>
    internal static async Task<long> AllocatedBytesAsync(string path)
    {
        var map = await PeerTool.RunCheckedAsync("qemu-img", ["map", "--output=json", "-f", "raw", path]);
        return AllocationMap.FromQemuImg(map.StandardOutput).Where(run => !run.Hole).Sum(run => run.Length);
    }
}
