using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>Spindle's server driven by libnbd's Python bindings (the engine of nbdsh) and by nbdsh itself.</summary>
public sealed class NbdshTests
{
    private static string Script(string name) => Path.Combine(AppContext.BaseDirectory, "python", name);

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Every_command_works_through_libnbd(bool unix)
    {
        await using var server = await InteropServer.StartAsync();
        var result = await PeerTool.RunAsync(PeerTool.SystemPython, [Script("commands.py"), unix ? server.UnixUri("mem") : server.Uri("mem"), InteropServer.Size.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal("OK", result.StandardOutput.Trim());
    }

    [Fact]
    public async Task Every_error_path_gets_the_prescribed_errno()
    {
        await using var server = await InteropServer.StartAsync();
        var result = await PeerTool.RunAsync(PeerTool.SystemPython, [Script("errors.py"), server.Uri("mem"), server.Uri("ro"), InteropServer.Size.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal("OK", result.StandardOutput.Trim());

        // Each refusal was logged with the client's address.
        Assert.Contains(server.Server.Logs.Lines, l => l.Contains("127.0.0.1", StringComparison.Ordinal) && l.Contains("EPERM", StringComparison.Ordinal));
        Assert.Contains(server.Server.Logs.Lines, l => l.Contains("127.0.0.1", StringComparison.Ordinal) && l.Contains("ENOSPC", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Nbdsh_reads_and_writes()
    {
        await using var server = await InteropServer.StartAsync();
        var script = """
            assert h.get_size() == 64 * 1024 * 1024
            h.pwrite(b"spindle" * 100, 12345)
            assert h.pread(700, 12345) == b"spindle" * 100
            print(h.get_protocol(), h.get_export_name())
            """;
        var result = await PeerTool.RunCheckedAsync("nbdsh", ["--base-allocation", "-u", server.Uri("mem"), "-c", script]);
        Assert.Contains("newstyle-fixed mem", result.StandardOutput, StringComparison.Ordinal);
        var check = new byte[700];
        await server.Memory.ReadAsync(12345, check, CancellationToken.None);
        Assert.Equal(System.Text.Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("spindle", 100))), check);
    }
}
