using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>spindle info against nbdinfo itself: the same JSON keys (jq filters carry over), --size, --can, --is.</summary>
public sealed class InfoTests
{
    private const string Exports = "[disk]\n    exportname = $DIR/disk.img\n    filesize = 16M\n    description = the disk\n[ro]\n    backend = memory\n    size = 1536M\n    readonly = true\n    rotational = true\n";

    [Fact]
    public async Task Json_has_nbdinfos_keys_and_jq_filters_for_nbdinfo_give_the_same_answers()
    {
        await using var server = await OpsServer.StartAsync(Exports, control: false);
        foreach (var export in new[] { "disk", "ro" })
        {
            var theirs = (await PeerTool.RunCheckedAsync("nbdinfo", ["--json", server.Uri(export)])).StandardOutput;
            var ours = (await PeerTool.RunCheckedAsync(SpindleExecutable.Path, ["info", "--json", server.Uri(export)])).StandardOutput;
            AssertSameKeys(theirs, ours);

            foreach (var filter in new[] { ".exports[0][\"export-size\"]", ".exports[0][\"export-size-str\"]", ".exports[] | select(.is_read_only) | .[\"export-name\"]",
                ".exports[0] | [.can_flush, .can_fua, .can_trim, .can_zero, .can_multi_conn, .can_cache, .is_rotational]", ".exports[0].contexts", ".protocol, .TLS, .structured",
                ".exports[0].block_size_preferred", ".exports[0].description" })
            {
                var expected = await PeerTool.RunCheckedAsync("jq", ["-c", filter], standardInput: theirs);
                var actual = await PeerTool.RunCheckedAsync("jq", ["-c", filter], standardInput: ours);
                Assert.True(expected.StandardOutput == actual.StandardOutput, $"jq '{filter}' on {export}: nbdinfo {expected.StandardOutput} spindle {actual.StandardOutput}");
            }
        }

        var listTheirs = (await PeerTool.RunCheckedAsync("nbdinfo", ["--list", "--json", server.Uri(string.Empty)])).StandardOutput;
        var listOurs = (await PeerTool.RunCheckedAsync(SpindleExecutable.Path, ["info", "--list", "--json", server.Uri(string.Empty)])).StandardOutput;
        AssertSameKeys(listTheirs, listOurs);
        var names = await PeerTool.RunCheckedAsync("jq", ["-c", "[.exports[][\"export-name\"]] | sort"], standardInput: listOurs);
        Assert.Equal("[\"disk\",\"ro\"]", names.StandardOutput.Trim());
    }

    [Fact]
    public async Task Size_can_and_is_exit_like_nbdinfo()
    {
        await using var server = await OpsServer.StartAsync(Exports, control: false);
        foreach (var export in new[] { "disk", "ro" })
        {
            var size = await PeerTool.RunCheckedAsync(SpindleExecutable.Path, ["info", "--size", server.Uri(export)]);
            Assert.Equal((await PeerTool.RunCheckedAsync("nbdinfo", ["--size", server.Uri(export)])).StandardOutput, size.StandardOutput);
            foreach (var (option, feature) in new[] { ("--can", "connect"), ("--can", "read"), ("--can", "write"), ("--can", "flush"), ("--can", "fua"), ("--can", "trim"), ("--can", "zero"),
                ("--can", "fast-zero"), ("--can", "multi-conn"), ("--can", "cache"), ("--can", "df"), ("--can", "structured"), ("--can", "tls"), ("--is", "read-only"), ("--is", "rotational"), ("--can", "no-such-thing") })
            {
                var theirs = await PeerTool.RunAsync("nbdinfo", [option, feature, server.Uri(export)]);
                var ours = await PeerTool.RunAsync(SpindleExecutable.Path, ["info", option, feature, server.Uri(export)]);
                Assert.True(theirs.ExitCode == ours.ExitCode, $"{option} {feature} on {export}: nbdinfo exits {theirs.ExitCode}, spindle {ours.ExitCode}\n{ours}");
            }
        }

        Assert.Equal(1, (await PeerTool.RunAsync(SpindleExecutable.Path, ["info", "--can", "connect", $"nbd://127.0.0.1:{OpsServer.FreePort()}/"])).ExitCode);
    }

    /// <summary>Every key nbdinfo prints is in Spindle's output, at the same place; Spindle adds only "extended" and "spindle".</summary>
    private static void AssertSameKeys(string nbdinfo, string spindle)
    {
        using var theirs = JsonDocument.Parse(nbdinfo);
        using var ours = JsonDocument.Parse(spindle);
        var theirKeys = Keys(theirs.RootElement, string.Empty).ToHashSet();
        var ourKeys = Keys(ours.RootElement, string.Empty).ToHashSet();
        Assert.True(!theirKeys.Except(ourKeys).Any(), $"missing {string.Join(", ", theirKeys.Except(ourKeys))}\nnbdinfo:\n{nbdinfo}\nspindle:\n{spindle}");
        Assert.All(ourKeys.Except(theirKeys), key => Assert.True(key is ".extended" || key.Contains(".spindle", StringComparison.Ordinal), $"spindle adds {key}"));
    }

    private static IEnumerable<string> Keys(JsonElement element, string path) => element.ValueKind switch
    {
        JsonValueKind.Object => element.EnumerateObject().SelectMany(p => Keys(p.Value, $"{path}.{p.Name}").Prepend($"{path}.{p.Name}")),
        JsonValueKind.Array => element.EnumerateArray().SelectMany(e => Keys(e, path + "[]")),
        _ => [],
    };
}
