using System.Text.Json;
using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>Spindle's server driven by libnbd's nbdinfo and nbdcopy.</summary>
public sealed class LibnbdToolTests
{
    [Fact]
    public async Task Nbdinfo_json_reports_size_flags_block_sizes_and_contexts()
    {
        await using var server = await InteropServer.StartAsync();
        var result = await PeerTool.RunCheckedAsync("nbdinfo", ["--json", server.Uri()]);
        using var json = JsonDocument.Parse(result.StandardOutput);
        var root = json.RootElement;
        Assert.Equal("newstyle-fixed", root.GetProperty("protocol").GetString());
        Assert.False(root.GetProperty("TLS").GetBoolean());
        Assert.True(root.GetProperty("structured").GetBoolean());
        var export = root.GetProperty("exports")[0];
        Assert.Equal(InteropServer.Size, export.GetProperty("export-size").GetInt64());
        foreach (var flag in new[] { "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df", "can_multi_conn" })
        {
            Assert.True(export.GetProperty(flag).GetBoolean(), flag);
        }

        Assert.False(export.GetProperty("is_read_only").GetBoolean());
        Assert.Equal(1, export.GetProperty("block_size_minimum").GetInt32());
        Assert.Equal(4096, export.GetProperty("block_size_preferred").GetInt32());
        Assert.Equal(NbdLimits.DefaultMaxPayload, export.GetProperty("block_size_maximum").GetInt32());
        Assert.Contains("base:allocation", export.GetProperty("contexts").EnumerateArray().Select(c => c.GetString()));
    }

    [Fact]
    public async Task Nbdinfo_sees_a_read_only_export_as_read_only()
    {
        await using var server = await InteropServer.StartAsync();
        var result = await PeerTool.RunCheckedAsync("nbdinfo", ["--json", server.Uri("ro")]);
        using var json = JsonDocument.Parse(result.StandardOutput);
        var export = json.RootElement.GetProperty("exports")[0];
        Assert.True(export.GetProperty("is_read_only").GetBoolean());
        Assert.False(export.GetProperty("can_trim").GetBoolean());
        Assert.False(export.GetProperty("can_zero").GetBoolean());
        Assert.Equal(0, (await PeerTool.RunAsync("nbdinfo", ["--is", "read-only", server.Uri("ro")])).ExitCode);
        Assert.Equal(0, (await PeerTool.RunAsync("nbdinfo", ["--can", "multi-conn", server.Uri("ro")])).ExitCode);
    }

    [Fact]
    public async Task Nbdinfo_list_shows_every_export_and_description()
    {
        await using var server = await InteropServer.StartAsync();
        var result = await PeerTool.RunCheckedAsync("nbdinfo", ["--list", "--json", server.Uri()]);
        using var json = JsonDocument.Parse(result.StandardOutput);
        var exports = json.RootElement.GetProperty("exports").EnumerateArray()
            .Where(e => !e.GetProperty("export-name").GetString()!.StartsWith("by-", StringComparison.Ordinal))
            .ToDictionary(e => e.GetProperty("export-name").GetString()!, e => e);
        Assert.Equal(["disk", "mem", "ro"], exports.Keys.Order());
        Assert.Equal("a sparse file", exports["disk"].GetProperty("description").GetString());
        Assert.Equal(InteropServer.Size, exports["mem"].GetProperty("export-size").GetInt64());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Nbdinfo_map_shows_the_holes_of_a_sparse_file(bool unix)
    {
        await using var server = await InteropServer.StartAsync();
        var result = await PeerTool.RunCheckedAsync("nbdinfo", ["--map", "--json", unix ? server.UnixUri() : server.Uri()]);
        using var json = JsonDocument.Parse(result.StandardOutput);
        var map = json.RootElement.EnumerateArray()
            .Select(e => (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("type").GetInt32()))
            .ToList();
        const long mib = 1024 * 1024;
        Assert.Equal(
            [(0L, mib, 3), (mib, mib, 0), (2 * mib, 38 * mib, 3), (40 * mib, mib / 2, 0), (40 * mib + (mib / 2), 24 * mib - (mib / 2), 3)],
            map);
    }

    [Fact]
    public async Task Nbdcopy_out_of_spindle_is_byte_identical()
    {
        await using var server = await InteropServer.StartAsync();
        var output = server.Directory.File("copy.img");
        await PeerTool.RunCheckedAsync("nbdcopy", [server.Uri(), output]);
        Assert.Equal(await File.ReadAllBytesAsync(server.ImagePath), await File.ReadAllBytesAsync(output));

        // nbdcopy's own multi-connection mode over the Unix socket too.
        var viaUnix = server.Directory.File("copy-unix.img");
        await PeerTool.RunCheckedAsync("nbdcopy", ["--connections=4", server.UnixUri(), viaUnix]);
        Assert.Equal(await File.ReadAllBytesAsync(server.ImagePath), await File.ReadAllBytesAsync(viaUnix));
    }

    [Fact]
    public async Task Nbdcopy_into_spindle_keeps_a_sparse_source_sparse()
    {
        await using var server = await InteropServer.StartAsync();
        var source = server.Directory.CreateSparseFile("source.img", InteropServer.Size);
        var data = Patterns.Random(3 * 1024 * 1024, seed: 9);
        await using (var stream = new FileStream(source, FileMode.Open, FileAccess.Write))
        {
            stream.Position = 10L * 1024 * 1024;
            stream.Write(data);
        }

        await PeerTool.RunCheckedAsync("nbdcopy", [source, server.Uri("mem")]);
        var check = new byte[InteropServer.Size];
        await server.Memory.ReadAsync(0, check, CancellationToken.None);
        Assert.Equal(await File.ReadAllBytesAsync(source), check);

        // Only the 3 MiB of data were stored: the holes were never written as zeroes.
        Assert.InRange(server.Memory.AllocatedBytes, data.Length, data.Length + (128 * 1024));
        var extents = new ExtentList(100);
        await server.Memory.GetExtentsAsync(0, InteropServer.Size, extents, CancellationToken.None);
        Assert.Equal(3, extents.Count);
    }

    [Fact]
    public async Task Nbdcopy_between_two_spindle_exports()
    {
        await using var server = await InteropServer.StartAsync();
        await PeerTool.RunCheckedAsync("nbdcopy", ["--flush", server.Uri("disk"), server.Uri("mem")]);
        var check = new byte[InteropServer.Size];
        await server.Memory.ReadAsync(0, check, CancellationToken.None);
        Assert.Equal(await File.ReadAllBytesAsync(server.ImagePath), check);
    }
}
