using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>The <c>spindle serve</c> command as a user runs it: quick forms, configuration file, signals, errors.</summary>
public sealed class CliTests
{
    [Fact]
    public async Task Serve_a_file_write_through_qemu_io_and_stop_gracefully_on_sigterm()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", 32 * 1024 * 1024);
        await using var spindle = await SpindleProcess.StartAsync("serve", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        Assert.StartsWith("nbd://127.0.0.1:", spindle.Uri, StringComparison.Ordinal);

        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 1M 1M", spindle.Uri!]);
        var info = await PeerTool.RunCheckedAsync("nbdinfo", ["--json", spindle.Uri!]);
        using (var json = JsonDocument.Parse(info.StandardOutput))
        {
            Assert.Equal(32 * 1024 * 1024, json.RootElement.GetProperty("exports")[0].GetProperty("export-size").GetInt64());
        }

        Assert.Equal(0, await spindle.StopAsync(signal: 15));
        Assert.Contains(spindle.Output, line => line.Contains("Stopped", StringComparison.Ordinal));
        var bytes = await File.ReadAllBytesAsync(image);
        Assert.All(bytes[(1024 * 1024)..(2 * 1024 * 1024)], b => Assert.Equal(0x5a, b));
    }

    [Fact]
    public async Task Sigint_stops_it_too()
    {
        await using var spindle = await SpindleProcess.StartAsync("serve", "--memory", "16M", "--bind", "127.0.0.1", "--port", "0", "--print-uri");
        await PeerTool.RunCheckedAsync("nbdinfo", [spindle.Uri!]);
        Assert.Equal(0, await spindle.StopAsync(signal: 2));
    }

    [Fact]
    public async Task Serve_memory_on_a_unix_socket_read_only()
    {
        using var directory = new TempDirectory();
        var socket = directory.File("spindle.sock");
        await using var spindle = await SpindleProcess.StartAsync("serve", "--memory", "1G", "--unix", socket, "-r", "--name", "scratch", "--print-uri");
        Assert.Equal($"nbd+unix:///scratch?socket={socket}", spindle.Uri);
        var info = await PeerTool.RunCheckedAsync("nbdinfo", ["--json", spindle.Uri!]);
        using var json = JsonDocument.Parse(info.StandardOutput);
        var export = json.RootElement.GetProperty("exports")[0];
        Assert.Equal(1L << 30, export.GetProperty("export-size").GetInt64());
        Assert.True(export.GetProperty("is_read_only").GetBoolean());
        Assert.Equal(0, await spindle.StopAsync());
        Assert.False(File.Exists(socket));
    }

    [Fact]
    public async Task Serve_a_configuration_file_with_several_exports()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("a.img", 8 * 1024 * 1024);
        var config = directory.File("config");
        await File.WriteAllTextAsync(config, $"""
            [generic]
                listenaddr = 127.0.0.1
                port = 0
                default = first

            [first]
                exportname = {image}
                description = the first disk

            [second]
                backend = memory
                size = 2M
                readonly = true

            [third]
                exportname = {directory.File("created.img")}
                filesize = 3M
            """);
        await using var spindle = await SpindleProcess.StartAsync("serve", "--config", config, "--print-uri");
        var list = await PeerTool.RunCheckedAsync("nbdinfo", ["--list", "--json", spindle.Uri!]);
        using var json = JsonDocument.Parse(list.StandardOutput);
        var exports = json.RootElement.GetProperty("exports").EnumerateArray()
            .Where(e => !e.GetProperty("export-name").GetString()!.StartsWith("by-", StringComparison.Ordinal))
            .ToDictionary(e => e.GetProperty("export-name").GetString()!, e => e.GetProperty("export-size").GetInt64());
        Assert.Equal(new Dictionary<string, long> { ["first"] = 8 << 20, ["second"] = 2 << 20, ["third"] = 3 << 20 }, exports);
        Assert.Equal(3 << 20, new FileInfo(directory.File("created.img")).Length);

        // The empty name reaches the configured default export.
        var info = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", spindle.Uri!.Split('/')[0] + "//" + spindle.Uri.Split('/')[2] + "/"]);
        Assert.Equal((8 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), info.StandardOutput.Trim());
    }

    [Fact]
    public async Task A_missing_image_is_a_clear_error()
    {
        using var directory = new TempDirectory();
        var result = await SpindleProcess.RunAsync("serve", "--bind", "127.0.0.1", directory.File("nope.img"));
        Assert.Equal(1, result.ExitCode);
        Assert.Contains("spindle: error:", result.StandardError, StringComparison.Ordinal);
        Assert.Contains("does not exist", result.StandardError, StringComparison.Ordinal);
        Assert.Contains("--create", result.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Create_makes_a_sparse_image_of_the_given_size()
    {
        using var directory = new TempDirectory();
        var image = directory.File("new.img");
        await using var spindle = await SpindleProcess.StartAsync("serve", "--create", "5G", "--bind", "127.0.0.1", "--port", "0", "--print-uri", image);
        Assert.Equal(5L << 30, new FileInfo(image).Length);
        var size = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", spindle.Uri!]);
        Assert.Equal((5L << 30).ToString(System.Globalization.CultureInfo.InvariantCulture), size.StandardOutput.Trim());
    }

    [Theory]
    [InlineData(new[] { "serve" }, "nothing to serve")]
    [InlineData(new[] { "serve", "--memory", "1G", "x.img" }, "only one of")]
    [InlineData(new[] { "serve", "--memory", "lots" }, "not a size")]
    [InlineData(new[] { "serve", "--memory", "1G", "--port", "99999" }, "not a TCP port")]
    [InlineData(new[] { "serve", "--memory", "1G", "--bind", "not-an-address" }, "not an IP address")]
    [InlineData(new[] { "serve", "--memory", "1G", "--log-level", "loud" }, "unknown log level")]
    public async Task Usage_mistakes_exit_2_with_a_message(string[] arguments, string message)
    {
        var result = await SpindleProcess.RunAsync(arguments);
        Assert.Equal(2, result.ExitCode);
        Assert.Contains(message, result.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_bad_configuration_names_the_line()
    {
        using var directory = new TempDirectory();
        var config = directory.File("bad.conf");
        await File.WriteAllTextAsync(config, "[generic]\n[disk]\nexportname = /x\nmultifile = true\n");
        var result = await SpindleProcess.RunAsync("serve", "--config", config);
        Assert.Equal(2, result.ExitCode);
        Assert.Contains($"{config}:4", result.StandardError, StringComparison.Ordinal);
        Assert.Contains("multifile", result.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_port_already_in_use_is_a_clear_error()
    {
        await using var first = await SpindleProcess.StartAsync("serve", "--memory", "1M", "--bind", "127.0.0.1", "--port", "0", "--print-uri");
        var port = new Uri(first.Uri!).Port.ToString(System.Globalization.CultureInfo.InvariantCulture);
        var result = await SpindleProcess.RunAsync("serve", "--memory", "1M", "--bind", "127.0.0.1", "--port", port);

        // Refused, not silently sharing the port (which SO_REUSEPORT would allow).
        Assert.Equal(1, result.ExitCode);
        Assert.Contains($"cannot listen on 127.0.0.1:{port}", result.StandardError, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Restarting_on_the_same_port_right_after_serving_clients_works()
    {
        string port;
        await using (var first = await SpindleProcess.StartAsync("serve", "--memory", "1M", "--bind", "127.0.0.1", "--port", "0", "--print-uri"))
        {
            port = new Uri(first.Uri!).Port.ToString(System.Globalization.CultureInfo.InvariantCulture);
            for (var i = 0; i < 3; i++)
            {
                await PeerTool.RunCheckedAsync("nbdinfo", [first.Uri!]);
            }

            // The server closes connections on the way out, leaving them in TIME_WAIT on its port.
            await using var held = await RawNbdClient.ConnectAsync(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, int.Parse(port, System.Globalization.CultureInfo.InvariantCulture)));
            await held.NegotiateAsync("");
            Assert.Equal(0, await first.StopAsync());
        }

        await using var second = await SpindleProcess.StartAsync("serve", "--memory", "1M", "--bind", "127.0.0.1", "--port", port, "--print-uri");
        await PeerTool.RunCheckedAsync("nbdinfo", [second.Uri!]);
    }

    [Fact]
    public async Task Stable_names_from_the_command_line_and_sigusr1_cuts_every_connection()
    {
        using var directory = new TempDirectory();
        var image = directory.CreateSparseFile("disk.img", 4 << 20);
        const string uuid = "0b2e3f4a-5c6d-4e7f-8a9b-0c1d2e3f4a5b";
        await using var spindle = await SpindleProcess.StartAsync("serve", "--bind", "127.0.0.1", "--port", "0", "--print-uri", "--uuid", uuid, "--label", "scratch", "--serial", "SN-7", image);
        var port = new Uri(spindle.Uri!).Port;
        foreach (var alias in new[] { "by-uuid/" + uuid, "by-label/scratch", "by-serial/SN-7" })
        {
            var size = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", $"nbd://127.0.0.1:{port}/{alias}"]);
            Assert.Equal((4 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), size.StandardOutput.Trim());
        }

        // A connected client is cut by SIGUSR1 while the server keeps listening.
        await using var client = await RawNbdClient.ConnectAsync(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, port));
        await client.NegotiateAsync("");
        PeerTool.Signal(spindle.Process, 10);
        Assert.True(await client.WaitForCloseAsync(TimeSpan.FromSeconds(10)));
        await spindle.WaitForLineAsync(line => line.Contains("SIGUSR1: cut 1 client connections", StringComparison.Ordinal), TimeSpan.FromSeconds(10));
        await PeerTool.RunCheckedAsync("nbdinfo", ["--size", spindle.Uri!]);
    }

    [Fact]
    public async Task Help_tells_a_storage_engineer_what_to_do()
    {
        var result = await SpindleProcess.RunAsync("serve", "--help");
        Assert.Equal(0, result.ExitCode);
        foreach (var expected in new[] { "Examples", "--read-only", "--memory", "--unix", "--config", "--bind", "10809", "no authentication", "SIGTERM" })
        {
            Assert.Contains(expected, result.StandardOutput, StringComparison.Ordinal);
        }

        var version = await SpindleProcess.RunAsync("--version");
        Assert.Equal(0, version.ExitCode);
        Assert.Matches(@"^\d+\.\d+\.\d+", version.StandardOutput.Trim());
    }
}
