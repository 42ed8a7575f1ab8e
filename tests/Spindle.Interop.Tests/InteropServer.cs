using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;

namespace Spindle.Interop.Tests;

/// <summary>
/// An in-process Spindle server for peer tools, with three exports: "" / "disk" (a 64 MiB sparse file holding data at
/// 1 MiB and 40 MiB), "mem" (a 64 MiB memory disk) and "ro" (the same file, read-only).
/// </summary>
internal sealed class InteropServer : IAsyncDisposable
{
    public const long Size = 64L * 1024 * 1024;

    private InteropServer(TempDirectory directory, TestServer server, string imagePath, MemoryBlockDevice memory)
    {
        Directory = directory;
        Server = server;
        ImagePath = imagePath;
        Memory = memory;
    }

    public TempDirectory Directory { get; }

    public TestServer Server { get; }

    /// <summary>The file behind "disk" and "ro".</summary>
    public string ImagePath { get; }

    public MemoryBlockDevice Memory { get; }

    public static async Task<InteropServer> StartAsync()
    {
        var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", Size);
        await using (var stream = new FileStream(image, FileMode.Open, FileAccess.Write))
        {
            stream.Position = 1024 * 1024;
            stream.Write(Patterns.Generate(1024 * 1024, 1024 * 1024));
            stream.Position = 40L * 1024 * 1024;
            stream.Write(Patterns.Generate(40L * 1024 * 1024, 512 * 1024));
        }

        var memory = new MemoryBlockDevice(Size);
        var server = await TestServer.StartAsync(catalog =>
        {
            catalog.DefaultExportName = "disk";
            catalog.Add(new Export(new ExportOptions { Name = "disk", Description = "a sparse file" }, FileBlockDevice.Open(image, readOnly: false)));
            catalog.Add(new Export(new ExportOptions { Name = "mem", Description = "a memory disk" }, memory));
            catalog.Add(new Export(new ExportOptions { Name = "ro", ReadOnly = true }, FileBlockDevice.Open(image, readOnly: true)));
        });
        return new InteropServer(directory, server, image, memory);
    }

    public string Uri(string export = "disk") => Server.Uri(export);

    public string UnixUri(string export = "disk") => Server.UnixUri(export);

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        Directory.Dispose();
    }
}
