using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>Stable names: by-uuid/, by-label/ and by-serial/ aliases, and UUIDs kept across restarts.</summary>
public sealed class StableNameTests
{
    [Fact]
    public async Task Aliases_resolve_to_the_export_and_info_name_gives_the_canonical_name()
    {
        var uuid = Guid.Parse("6a1f3c6e-0d51-4c1e-9a39-5b1f0b7e2c11");
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(
            new ExportOptions { Name = "db", Label = "database", Serial = "SN-0042", Uuid = uuid },
            new MemoryBlockDevice(3 << 20))
        { Uuid = uuid }));
        await using var client = harness.Connect();
        await client.StartAsync();
        foreach (var alias in new[] { "by-uuid/" + uuid, "by-uuid/" + uuid.ToString("D").ToUpperInvariant(), "by-label/database", "by-serial/SN-0042" })
        {
            await client.SendOptionAsync(NbdOption.Info, new InfoRequest(alias, [InfoType.Name]).ToBytes());
            var replies = await client.ReadOptionRepliesAsync(NbdOption.Info);
            Assert.Equal(OptionReplyType.Ack, replies[^1].Header.Type);
            var name = replies.Single(r => InfoReplies.TryReadType(r.Data, out var t) && t == InfoType.Name);
            Assert.Equal("db", System.Text.Encoding.UTF8.GetString(name.Data.AsSpan(2)));
            Assert.True(InfoReplies.TryReadExport(replies[0].Data, out var size, out _));
            Assert.Equal(3ul << 20, size);
        }

        foreach (var missing in new[] { "by-uuid/not-a-uuid", "by-uuid/" + Guid.NewGuid(), "by-label/other", "by-serial/" })
        {
            await client.SendOptionAsync(NbdOption.Info, new InfoRequest(missing, []).ToBytes());
            Assert.Equal(OptionReplyType.ErrorUnknown, (await client.ReadOptionRepliesAsync(NbdOption.Info))[^1].Header.Type);
        }

        // GO through an alias enters transmission on the export itself.
        await client.SendOptionAsync(NbdOption.Go, new InfoRequest("by-label/database", []).ToBytes());
        Assert.Equal(OptionReplyType.Ack, (await client.ReadOptionRepliesAsync(NbdOption.Go))[^1].Header.Type);
        Assert.Equal(1, harness.Catalog.Exports.Single(e => e.Name == "db").ConnectionCount);
    }

    [Fact]
    public async Task A_client_learns_the_stable_names_with_an_x_spindle_meta_context_query()
    {
        var uuid = Guid.NewGuid();
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(
            new ExportOptions { Name = "db", Label = "database", Serial = "SN-1" }, new MemoryBlockDevice(1 << 20))
        { Uuid = uuid }));
        await using var client = harness.Connect();
        await client.StartAsync();
        await client.SendOptionAsync(NbdOption.StructuredReply);
        await client.ReadOptionReplyAsync();

        await client.SendOptionAsync(NbdOption.ListMetaContext, new MetaContextRequest("db", ["x-spindle:"]).ToBytes());
        var names = (await client.ReadOptionRepliesAsync(NbdOption.ListMetaContext)).SkipLast(1)
            .Select(r => MetaContextReply.TryParse(r.Data, out _, out var name) ? name : "?").ToList();
        Assert.Equal([$"x-spindle:uuid={uuid:D}", "x-spindle:label=database", "x-spindle:serial=SN-1"], names);

        // Listing every context (no query), as nbdinfo does, shows only base:allocation.
        await client.SendOptionAsync(NbdOption.ListMetaContext, new MetaContextRequest("db", []).ToBytes());
        Assert.Equal(2, (await client.ReadOptionRepliesAsync(NbdOption.ListMetaContext)).Count);

        // The identity entries cannot be selected.
        await client.SendOptionAsync(NbdOption.SetMetaContext, new MetaContextRequest("db", ["x-spindle:", $"x-spindle:uuid={uuid:D}"]).ToBytes());
        Assert.Single(await client.ReadOptionRepliesAsync(NbdOption.SetMetaContext));

        // Aliases are resolvable but not listed by default.
        await client.SendOptionAsync(NbdOption.List);
        Assert.Equal(["mem", "ro", "db"], (await client.ReadOptionRepliesAsync(NbdOption.List)).SkipLast(1).Select(r => ServerReply.TryParse(r.Data, out var n, out _) ? n : "?"));
    }

    [Fact]
    public void Duplicate_stable_names_are_refused()
    {
        var catalog = new ExportCatalog();
        catalog.Add(new Export(new ExportOptions { Name = "a", Label = "same" }, new MemoryBlockDevice(4096)));
        Assert.Throws<ArgumentException>(() => catalog.Add(new Export(new ExportOptions { Name = "b", Label = "same" }, new MemoryBlockDevice(4096))));
        var uuid = catalog.Exports[0].Uuid;
        Assert.Throws<ArgumentException>(() => catalog.Add(new Export(new ExportOptions { Name = "c" }, new MemoryBlockDevice(4096)) { Uuid = uuid }));
    }

    [Fact]
    public async Task A_files_uuid_is_generated_once_and_kept_with_the_file()
    {
        using var directory = new TempDirectory();
        var path = directory.CreateSparseFile("disk.img", 1 << 20);
        Guid first;
        await using (var device = FileBlockDevice.Open(path, readOnly: false))
        {
            first = ExportIdentity.Assign(new ExportOptions(), device, directory.File("state"), out var note);
            Assert.Contains("new", note, StringComparison.Ordinal);
        }

        // Moved elsewhere and reopened read-only: the UUID travels with the file (its user.spindle.uuid attribute).
        var moved = directory.File("renamed.img");
        File.Move(path, moved);
        await using (var device = FileBlockDevice.Open(moved, readOnly: true))
        {
            Assert.Equal(first, ExportIdentity.Assign(new ExportOptions(), device, directory.File("state"), out var note));
            Assert.Contains("attribute", note, StringComparison.Ordinal);
        }

        // A configured UUID always wins; a memory disk gets a new one.
        var configured = Guid.NewGuid();
        await using (var device = FileBlockDevice.Open(moved, readOnly: true))
        {
            Assert.Equal(configured, ExportIdentity.Assign(new ExportOptions { Uuid = configured }, device, null, out _));
        }

        await using var memory = new MemoryBlockDevice(4096);
        Assert.NotEqual(first, ExportIdentity.Assign(new ExportOptions(), memory, null, out _));
    }

    [Theory]
    [InlineData("db-1", true)]
    [InlineData("SN:0042_a.b+c@d", true)]
    [InlineData("", false)]
    [InlineData("a/b", false)]
    [InlineData("a b", false)]
    [InlineData("..", true)]
    public void Labels_and_serials_are_plain_tags(string tag, bool valid) => Assert.Equal(valid, ExportIdentity.IsValidTag(tag, out _));
}
