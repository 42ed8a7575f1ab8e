using System.Diagnostics.Metrics;
using System.Text;
using Spindle.Cli.Hosting.Metrics;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>
/// The one instrument the server feeds per request (the latency histogram, while something listens) goes through the
/// Prometheus bridge's measurement callback: that path must not allocate, or every request would make garbage.
/// </summary>
public sealed class MetricsHotPathTests
{
    [Fact]
    public async Task A_histogram_measurement_through_the_bridge_allocates_nothing_and_is_scraped()
    {
        var meterName = "Spindle.Ops.Tests.HotPath." + Guid.NewGuid().ToString("N");
        using var meter = new Meter(meterName);
        using var bridge = new PrometheusBridge(meterName);
        var duration = meter.CreateHistogram<double>("hot.request.duration", "s", "Request latency, as the server's.");
        Assert.True(duration.Enabled);

        var export = new KeyValuePair<string, object?>("export", "disk");
        var commands = new[] { "read", "write" };
        // Warm-up: the first measurements create each label set's child and whatever prometheus-net sets up lazily.
        for (var i = 0; i < 10_000; i++)
        {
            duration.Record(0.0001, export, new KeyValuePair<string, object?>("command", commands[i & 1]));
        }

        var before = GC.GetAllocatedBytesForCurrentThread();
        for (var i = 0; i < 100_000; i++)
        {
            duration.Record(0.0002, export, new KeyValuePair<string, object?>("command", commands[i & 1]));
        }

        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);

        using var text = new MemoryStream();
        await bridge.Registry.CollectAndExportAsTextAsync(text, TestContext.Current.CancellationToken);
        var exposition = Encoding.UTF8.GetString(text.ToArray());
        Assert.Contains("hot_request_duration_seconds_count{command=\"read\",export=\"disk\"} 55000", exposition, StringComparison.Ordinal);
        Assert.Contains("hot_request_duration_seconds_count{command=\"write\",export=\"disk\"} 55000", exposition, StringComparison.Ordinal);
    }
}
