using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json;

namespace Spindle.Cli.Hosting;

/// <summary>
/// What the running server shows about itself: the status page at <c>/</c> of the metrics endpoint (exports,
/// connections with peer, TLS identity, export, age and current rates, totals) and the JSON the control socket answers
/// <c>exports</c> and <c>connections</c> with. Rates come from a sample taken every second.
/// </summary>
internal sealed partial class ServerHost
{
    private readonly Lock _rateLock = new();
    private Dictionary<long, RateSample> _previous = [];
    private Dictionary<long, (double Read, double Written, double Requests)> _rates = [];

    private sealed record RateSample(long Ticks, long Read, long Written, long Requests);

    /// <summary>Bytes read and written, all commands, per connection since the last sample.</summary>
    private void SampleRates()
    {
        if (_server is null)
        {
            return;
        }

        var now = Environment.TickCount64;
        var samples = new Dictionary<long, RateSample>();
        var rates = new Dictionary<long, (double, double, double)>();
        foreach (var connection in _server.Connections)
        {
            var sample = new RateSample(now, connection.Counters.Bytes(0), connection.Counters.Bytes(1), connection.Counters.TotalOperations);
            samples[connection.Id] = sample;
            if (_previous.TryGetValue(connection.Id, out var before) && now > before.Ticks)
            {
                var seconds = (now - before.Ticks) / 1000.0;
                rates[connection.Id] = ((sample.Read - before.Read) / seconds, (sample.Written - before.Written) / seconds, (sample.Requests - before.Requests) / seconds);
            }
        }

        lock (_rateLock)
        {
            _previous = samples;
            _rates = rates;
        }
    }

    private (double Read, double Written, double Requests) RateOf(long id)
    {
        lock (_rateLock)
        {
            return _rates.GetValueOrDefault(id);
        }
    }

    /// <summary>The status page: plain HTML that reloads itself every 5 seconds, no script.</summary>
    internal string RenderStatusPage()
    {
        var html = new StringBuilder();
        var exports = _catalog.Exports;
        var connections = _server?.Connections ?? [];
        var statistics = exports.Select(export => (Export: export, Counters: export.Statistics())).ToList();
        html.Append("""
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
            <title>Spindle status</title>
            <style>
            body{font-family:sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
            table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
            td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#eee}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}
            </style></head><body>
            """);
        html.Append(CultureInfo.InvariantCulture, $"<h1>Spindle {Encode(Version)}</h1>\n");
        html.Append("<h2>Totals</h2>\n<dl id=\"totals\">");
        Term(html, "Up for", Age(DateTimeOffset.UtcNow - _started));
        Term(html, "Exports", exports.Count.ToString(CultureInfo.InvariantCulture));
        Term(html, "Connections", connections.Count.ToString(CultureInfo.InvariantCulture));
        Term(html, "Requests answered", statistics.Sum(s => s.Counters.TotalOperations).ToString(CultureInfo.InvariantCulture));
        Term(html, "Bytes read", Bytes(statistics.Sum(s => s.Counters.Bytes(0))));
        Term(html, "Bytes written", Bytes(statistics.Sum(s => s.Counters.Bytes(1))));
        Term(html, "Errors", statistics.Sum(s => s.Counters.TotalErrors).ToString(CultureInfo.InvariantCulture));
        html.Append("</dl>\n<h2>Exports</h2>\n<table id=\"exports\"><thead><tr><th>Name</th><th>Backend</th><th>Size</th><th>Mode</th><th>Connections</th><th>Requests</th><th>Read</th><th>Written</th><th>Errors</th></tr></thead><tbody>\n");
        foreach (var (export, counters) in statistics)
        {
            html.Append(CultureInfo.InvariantCulture, $"<tr><td>{Encode(export.Name.Length == 0 ? "(default)" : export.Name)}</td><td>{Encode(export.Device.Description)}</td><td class=\"n\">{Bytes(export.Size)}</td>");
            html.Append(CultureInfo.InvariantCulture, $"<td>{(export.IsReadOnly ? "read-only" : "read-write")}</td><td class=\"n\">{export.ConnectionCount}</td><td class=\"n\">{counters.TotalOperations}</td>");
            html.Append(CultureInfo.InvariantCulture, $"<td class=\"n\">{Bytes(counters.Bytes(0))}</td><td class=\"n\">{Bytes(counters.Bytes(1))}</td><td class=\"n\">{counters.TotalErrors}</td></tr>\n");
        }

        html.Append("</tbody></table>\n<h2>Connections</h2>\n<table id=\"connections\"><thead><tr><th>Id</th><th>Peer</th><th>Transport</th><th>TLS identity</th><th>Export</th><th>Age</th><th>Requests</th><th>Read rate</th><th>Write rate</th><th>In flight</th></tr></thead><tbody>\n");
        foreach (var connection in connections)
        {
            var rate = RateOf(connection.Id);
            var tls = connection.Tls ? connection.TlsIdentity ?? "TLS, no client certificate" : "no TLS";
            html.Append(CultureInfo.InvariantCulture, $"<tr><td class=\"n\">{connection.Id}</td><td>{Encode(connection.Peer)}</td><td>{connection.Transport}</td><td>{Encode(tls)}</td>");
            html.Append(CultureInfo.InvariantCulture, $"<td>{Encode(connection.Export ?? "(negotiating)")}</td><td>{Age(DateTimeOffset.UtcNow - connection.ConnectedAt)}</td><td class=\"n\">{connection.Counters.TotalOperations}</td>");
            html.Append(CultureInfo.InvariantCulture, $"<td class=\"n\">{Bytes((long)rate.Read)}/s</td><td class=\"n\">{Bytes((long)rate.Written)}/s</td><td class=\"n\">{connection.RequestsInFlight}</td></tr>\n");
        }

        if (connections.Count == 0)
        {
            html.Append("<tr><td colspan=\"10\">No client is connected.</td></tr>\n");
        }

        html.Append("</tbody></table>\n<p>Prometheus metrics: <a href=\"/metrics\">/metrics</a></p>\n</body></html>\n");
        return html.ToString();
    }

    /// <summary>The control socket's <c>exports</c> answer.</summary>
    internal void WriteExports(Utf8JsonWriter json)
    {
        json.WriteStartArray("exports");
        foreach (var export in _catalog.Exports)
        {
            var counters = export.Statistics();
            json.WriteStartObject();
            json.WriteString("name", export.Name);
            json.WriteString("backend", export.Device.Description);
            json.WriteNumber("size", export.Size);
            json.WriteBoolean("read_only", export.IsReadOnly);
            json.WriteString("uuid", export.Uuid.ToString("D"));
            json.WriteString("source", _definitions.TryGetValue(export.Name, out var definition) ? definition.Source : "command line");
            json.WriteNumber("connections", export.ConnectionCount);
            json.WriteNumber("requests", counters.TotalOperations);
            json.WriteNumber("bytes_read", counters.Bytes(0));
            json.WriteNumber("bytes_written", counters.Bytes(1));
            json.WriteNumber("errors", counters.TotalErrors);
            json.WriteEndObject();
        }

        json.WriteEndArray();
    }

    /// <summary>The control socket's <c>connections</c> answer.</summary>
    internal void WriteConnections(Utf8JsonWriter json)
    {
        json.WriteStartArray("connections");
        foreach (var connection in Server.Connections)
        {
            var rate = RateOf(connection.Id);
            json.WriteStartObject();
            json.WriteNumber("id", connection.Id);
            json.WriteString("peer", connection.Peer);
            json.WriteString("transport", connection.Transport);
            json.WriteBoolean("tls", connection.Tls);
            if (connection.TlsIdentity is { } identity)
            {
                json.WriteString("tls_identity", identity);
            }

            if (connection.Export is { } export)
            {
                json.WriteString("export", export);
            }

            json.WriteNumber("age_seconds", Math.Round((DateTimeOffset.UtcNow - connection.ConnectedAt).TotalSeconds, 1));
            json.WriteNumber("requests", connection.Counters.TotalOperations);
            json.WriteNumber("bytes_read", connection.Counters.Bytes(0));
            json.WriteNumber("bytes_written", connection.Counters.Bytes(1));
            json.WriteNumber("errors", connection.Counters.TotalErrors);
            json.WriteNumber("read_rate", Math.Round(rate.Read));
            json.WriteNumber("write_rate", Math.Round(rate.Written));
            json.WriteNumber("in_flight", connection.RequestsInFlight);
            json.WriteBoolean("draining", connection.Draining);
            json.WriteEndObject();
        }

        json.WriteEndArray();
    }

    /// <summary>The control socket's <c>status</c> answer: the summary line and the server's totals.</summary>
    internal void WriteStatus(Utf8JsonWriter json)
    {
        json.WriteString("status", StatusLine());
        json.WriteString("version", Version);
        json.WriteNumber("pid", Environment.ProcessId);
        json.WriteNumber("uptime_seconds", Math.Round((DateTimeOffset.UtcNow - _started).TotalSeconds));
        json.WriteString("configuration", _options.ConfigFile ?? "command line");
    }

    private static string Version => typeof(ServerHost).Assembly.GetName().Version?.ToString(3) ?? "0";

    private static void Term(StringBuilder html, string term, string value) =>
        html.Append(CultureInfo.InvariantCulture, $"<dt>{Encode(term)}</dt><dd>{Encode(value)}</dd>");

    private static string Encode(string text) => WebUtility.HtmlEncode(text);

    internal static string Bytes(long bytes) => bytes switch
    {
        >= 1L << 40 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 40):0.##} TiB"),
        >= 1L << 30 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 30):0.##} GiB"),
        >= 1L << 20 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 20):0.##} MiB"),
        >= 1L << 10 => string.Create(CultureInfo.InvariantCulture, $"{bytes / 1024.0:0.##} KiB"),
        _ => string.Create(CultureInfo.InvariantCulture, $"{bytes} B"),
    };

    private static string Age(TimeSpan age) => age.TotalHours >= 1
        ? string.Create(CultureInfo.InvariantCulture, $"{(int)age.TotalHours}h{age.Minutes:00}m")
        : age.TotalMinutes >= 1 ? string.Create(CultureInfo.InvariantCulture, $"{age.Minutes}m{age.Seconds:00}s") : string.Create(CultureInfo.InvariantCulture, $"{age.Seconds}s");
}
