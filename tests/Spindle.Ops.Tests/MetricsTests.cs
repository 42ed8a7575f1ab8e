using System.Text.Json;
using Spindle.Client;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>
/// spindle serve --metrics: a real Prometheus (Debian's) scrapes it and answers queries with Spindle's series;
/// promtool accepts the exposition; headless Chromium loads the status page.
/// </summary>
public sealed class MetricsTests
{
    private const string Exports = "[disk]\n    exportname = $DIR/disk.img\n    filesize = 16M\n[scratch]\n    backend = memory\n    size = 8M\n    readonly = true\n";

    [Fact]
    public async Task Prometheus_scrapes_the_endpoint_and_its_query_api_returns_spindle_series()
    {
        await using var server = await OpsServer.StartAsync(Exports, metrics: true);
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 1 0 1M", "-c", "read -P 1 0 1M", server.Uri("disk")]);

        // One request past the end (libnbd's checks off, so it reaches the server): an EINVAL for the errors counter.
        var beyond = await PeerTool.RunAsync("nbdsh", ["-u", server.Uri("disk"), "-c", "h.set_strict_mode(0)", "-c",
            "try:\n    h.pread(4096, 16 * 1024 * 1024)\nexcept nbd.Error as e:\n    print('refused', e.errno)"]);
        Assert.Contains("refused EINVAL", beyond.StandardOutput, StringComparison.Ordinal);

        var exposition = await server.HttpGetAsync("/metrics");
        Assert.Contains("spindle_server_operations_total{command=\"write\",export=\"disk\"} 1", exposition, StringComparison.Ordinal);
        Assert.Contains("spindle_server_bytes_total{command=\"read\",export=\"disk\"} 1048576", exposition, StringComparison.Ordinal);
        Assert.Contains("spindle_server_errors_total{command=\"read\",errno=\"EINVAL\",export=\"disk\"} 1", exposition, StringComparison.Ordinal);
        Assert.Contains("spindle_server_request_duration_seconds_bucket{command=\"write\",export=\"disk\",le=\"+Inf\"} 1", exposition, StringComparison.Ordinal);
        Assert.Contains("spindle_server_connections_accepted_total{transport=\"tcp\"} 2", exposition, StringComparison.Ordinal);
        Assert.Contains("# TYPE spindle_server_operations_total counter", exposition, StringComparison.Ordinal);
        Assert.Contains("# TYPE spindle_server_request_duration_seconds histogram", exposition, StringComparison.Ordinal);

        // promtool's linter: names, types, help, suffixes.
        var check = await PeerTool.RunAsync("promtool", ["check", "metrics"], standardInput: exposition);
        Assert.True(check.ExitCode == 0, check.ToString());

        // A refusal by reason: a client asking for an export that does not exist.
        var missing = await PeerTool.RunAsync("nbdinfo", [server.Uri("nope")]);
        Assert.NotEqual(0, missing.ExitCode);

        using var data = new TempDirectory();
        var prometheusPort = OpsServer.FreePort();
        await File.WriteAllTextAsync(data.File("prometheus.yml"), $"""
            global:
              scrape_interval: 1s
            scrape_configs:
              - job_name: spindle
                static_configs:
                  - targets: ['127.0.0.1:{server.MetricsPort}']
            """, TestContext.Current.CancellationToken);
        var prometheus = PeerTool.Start(PeerTool.Require("prometheus"),
            [$"--config.file={data.File("prometheus.yml")}", $"--storage.tsdb.path={data.File("tsdb")}", $"--web.listen-address=127.0.0.1:{prometheusPort}"], onOutput: _ => { });
        try
        {
            using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };
            JsonElement[] results = [];
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(90);
            while (results.Length == 0)
            {
                Assert.True(DateTime.UtcNow < deadline, "Prometheus returned no spindle series within 90 s");
                await Task.Delay(500, TestContext.Current.CancellationToken);
                try
                {
                    var answer = await http.GetStringAsync(new Uri($"http://127.0.0.1:{prometheusPort}/api/v1/query?query=spindle_server_bytes_total"), TestContext.Current.CancellationToken);
                    using var document = JsonDocument.Parse(answer);
                    results = [.. document.RootElement.GetProperty("data").GetProperty("result").EnumerateArray().Select(r => r.Clone())];
                }
                catch (HttpRequestException)
                {
                    // Prometheus is still starting.
                }
            }

            var written = results.Single(r => r.GetProperty("metric").GetProperty("export").GetString() == "disk" && r.GetProperty("metric").GetProperty("command").GetString() == "write");
            Assert.Equal("spindle", written.GetProperty("metric").GetProperty("job").GetString());
            Assert.Equal("1048576", written.GetProperty("value")[1].GetString());

            var refusals = await http.GetStringAsync(new Uri($"http://127.0.0.1:{prometheusPort}/api/v1/query?query=spindle_server_refusals_total"), TestContext.Current.CancellationToken);
            Assert.Contains("\"reason\":\"unknown_export\"", refusals, StringComparison.Ordinal);
        }
        finally
        {
            await PeerTool.StopAsync(prometheus);
        }
    }

    [Fact]
    public async Task Status_page_in_headless_chromium_shows_exports_connections_and_totals()
    {
        await using var server = await OpsServer.StartAsync(Exports, metrics: true);
        await using var client = await NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: TestContext.Current.CancellationToken);
        var block = new byte[65536];
        Array.Fill(block, (byte)7);
        for (var i = 0; i < 32; i++)
        {
            await client.WriteAsync(i * block.Length, block, TestContext.Current.CancellationToken);
        }

        using var profile = new TempDirectory();
        var url = $"http://127.0.0.1:{server.MetricsPort}/";
        string[] flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", $"--user-data-dir={profile.File("profile")}"];
        var dom = await PeerTool.RunAsync("chromium", [.. flags, "--dump-dom", url], TimeSpan.FromSeconds(120));
        Assert.True(dom.ExitCode == 0, dom.ToString());
        var html = dom.StandardOutput;
        Assert.Contains("<title>Spindle status</title>", html, StringComparison.Ordinal);
        var exports = Section(html, "<table id=\"exports\">");
        Assert.Contains("<td>disk</td>", exports, StringComparison.Ordinal);
        Assert.Contains("<td>scratch</td>", exports, StringComparison.Ordinal);
        Assert.Contains("read-only", exports, StringComparison.Ordinal);
        Assert.Contains("2 MiB", exports, StringComparison.Ordinal);
        var connections = Section(html, "<table id=\"connections\">");
        Assert.Contains("<td>127.0.0.1:", connections, StringComparison.Ordinal);
        Assert.Contains("<td>disk</td>", connections, StringComparison.Ordinal);
        Assert.Contains("<td>no TLS</td>", connections, StringComparison.Ordinal);
        var totals = Section(html, "<dl id=\"totals\">");
        Assert.Contains("<dt>Connections</dt><dd>1</dd>", totals, StringComparison.Ordinal);
        Assert.Contains("<dt>Bytes written</dt><dd>2 MiB</dd>", totals, StringComparison.Ordinal);

        // And a screenshot, as a person would see it (kept for the report when SPINDLE_SCREENSHOT names a file).
        var screenshot = Environment.GetEnvironmentVariable("SPINDLE_SCREENSHOT") ?? profile.File("status.png");
        var shot = await PeerTool.RunAsync("chromium", [.. flags, $"--screenshot={screenshot}", "--window-size=1200,700", url], TimeSpan.FromSeconds(120));
        Assert.True(shot.ExitCode == 0, shot.ToString());
        var png = await File.ReadAllBytesAsync(screenshot, TestContext.Current.CancellationToken);
        Assert.True(png.Length > 1000 && png[1] == (byte)'P' && png[2] == (byte)'N' && png[3] == (byte)'G', "not a PNG");
    }

    private static string Section(string html, string start)
    {
        var index = html.IndexOf(start, StringComparison.Ordinal);
        Assert.True(index >= 0, $"{start} is not on the page:\n{html}");
        var end = html.IndexOf(start.StartsWith("<dl", StringComparison.Ordinal) ? "</dl>" : "</table>", index, StringComparison.Ordinal);
        return html[index..end];
    }
}
