using System.Diagnostics.Metrics;
using Spindle.Protocol;

namespace Spindle.Server.Diagnostics;

/// <summary>
/// The server's instruments (System.Diagnostics.Metrics, meter <see cref="MeterName"/>): hosting exports them (the
/// spindle command: Prometheus' text format); the library only counts. The hot path stays cheap: per-request counts
/// go to the connection's own <see cref="CommandCounters"/> and are read by observable instruments when someone
/// collects; the only instrument fed per request is the latency histogram, and only while something listens to it.
/// </summary>
public sealed class ServerMetrics : IDisposable
{
    /// <summary>The meter's name, for a MeterListener or an exporter's filter.</summary>
    public const string MeterName = "Spindle.Server";

    private readonly NbdServer _server;
    private readonly Meter _meter;
    private readonly Histogram<double> _duration;
    private readonly Counter<long> _accepted;
    private readonly Counter<long> _refusals;

    internal ServerMetrics(NbdServer server)
    {
        _server = server;
        _meter = new Meter(MeterName, typeof(ServerMetrics).Assembly.GetName().Version?.ToString());
        _meter.CreateObservableCounter("spindle.server.operations", ObserveOperations, "{request}",
            "Requests answered, by export and command (errors included).");
        _meter.CreateObservableCounter("spindle.server.bytes", ObserveBytes, "By",
            "Bytes read or written by successful READ and WRITE; the range covered by TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS.");
        _meter.CreateObservableCounter("spindle.server.errors", ObserveErrors, "{request}",
            "Requests answered with an error, by export, command and errno.");
        _duration = _meter.CreateHistogram<double>("spindle.server.request.duration", "s",
            "Time from a request being parsed to its reply being queued, by export and command.");
        _meter.CreateObservableUpDownCounter("spindle.server.requests.in_flight", ObserveRequestsInFlight, "{request}",
            "Requests received and not yet answered, by export.");
        _meter.CreateObservableUpDownCounter("spindle.server.payload.in_flight", ObserveBytesInFlight, "By",
            "Payload bytes held (write data received, read data not yet sent), by export.");
        _meter.CreateObservableUpDownCounter("spindle.server.connections", ObserveConnections, "{connection}",
            "Open connections, by transport (tcp, unix) and whether TLS is up.");
        _accepted = _meter.CreateCounter<long>("spindle.server.connections.accepted", "{connection}",
            "Connections accepted, by transport.");
        _refusals = _meter.CreateCounter<long>("spindle.server.refusals", "{refusal}",
            "Clients refused, by reason: max_connections, export_busy, unknown_export, access_denied, tls_required, tls_failed, handshake_timeout, protocol_error, shutting_down.");
        _meter.CreateObservableUpDownCounter("spindle.server.exports", () => (long)_server.Catalog.Exports.Count, "{export}",
            "Exports served (named exports; directories count their images as they are opened).");
    }

    /// <summary>Whether requests are timed: only while a listener has the latency histogram enabled.</summary>
    internal bool TimesRequests => _duration.Enabled;

    internal void RecordDuration(string export, int slot, double seconds) =>
        _duration.Record(seconds, new KeyValuePair<string, object?>("export", export), new KeyValuePair<string, object?>("command", CommandCounters.CommandNames[slot]));

    internal void Accepted(string transport) => _accepted.Add(1, new KeyValuePair<string, object?>("transport", transport));

    internal void Refused(string reason) => _refusals.Add(1, new KeyValuePair<string, object?>("reason", reason));

    public void Dispose() => _meter.Dispose();

    /// <summary>Each export's statistics once: the catalog's exports, and images of directories that are in use.</summary>
    private List<(string Name, CommandCounters Counters)> Exports()
    {
        var seen = new HashSet<object>(ReferenceEqualityComparer.Instance);
        var result = new List<(string, CommandCounters)>();
        foreach (var export in _server.Catalog.Exports)
        {
            if (seen.Add(export.StatisticsKey))
            {
                result.Add((export.Name, export.Statistics()));
            }
        }

        foreach (var connection in _server.ConnectionsNow())
        {
            if (connection.Export is { IsRetired: false } export && seen.Add(export.StatisticsKey))
            {
                result.Add((export.Name, export.Statistics()));
            }
        }

        return result;
    }

    private IEnumerable<Measurement<long>> ObserveOperations() => PerCommand(static (counters, slot) => counters.Operations(slot));

    private IEnumerable<Measurement<long>> ObserveBytes() => PerCommand(static (counters, slot) => counters.Bytes(slot));

    private IEnumerable<Measurement<long>> PerCommand(Func<CommandCounters, int, long> read)
    {
        var measurements = new List<Measurement<long>>();
        foreach (var (name, counters) in Exports())
        {
            for (var slot = 0; slot < CommandCounters.Slots; slot++)
            {
                var value = read(counters, slot);
                if (value != 0 || slot is 0 or 1)
                {
                    measurements.Add(new Measurement<long>(value, new KeyValuePair<string, object?>("export", name), new KeyValuePair<string, object?>("command", CommandCounters.CommandNames[slot])));
                }
            }
        }

        return measurements;
    }

    private IEnumerable<Measurement<long>> ObserveErrors()
    {
        var measurements = new List<Measurement<long>>();
        foreach (var (name, counters) in Exports())
        {
            foreach (var (slot, error, count) in counters.Errors())
            {
                measurements.Add(new Measurement<long>(count, new KeyValuePair<string, object?>("export", name),
                    new KeyValuePair<string, object?>("command", CommandCounters.CommandNames[slot]), new KeyValuePair<string, object?>("errno", error.ToErrnoName())));
            }
        }

        return measurements;
    }

    private IEnumerable<Measurement<long>> ObserveRequestsInFlight() => PerExport(static c => c.RequestsInFlight);

    private IEnumerable<Measurement<long>> ObserveBytesInFlight() => PerExport(static c => c.BytesInFlight);

    private IEnumerable<Measurement<long>> PerExport(Func<ConnectionInfo, long> read)
    {
        var totals = _server.Catalog.Exports.ToDictionary(export => export.Name, _ => 0L, StringComparer.Ordinal);
        foreach (var connection in _server.Connections)
        {
            if (connection.Export is { } name)
            {
                totals[name] = totals.GetValueOrDefault(name) + read(connection);
            }
        }

        return totals.Select(pair => new Measurement<long>(pair.Value, new KeyValuePair<string, object?>("export", pair.Key)));
    }

    private IEnumerable<Measurement<long>> ObserveConnections()
    {
        var counts = new Dictionary<(string Transport, bool Tls), long>
        {
            [("tcp", false)] = 0,
        };
        foreach (var connection in _server.Connections)
        {
            counts[(connection.Transport, connection.Tls)] = counts.GetValueOrDefault((connection.Transport, connection.Tls)) + 1;
        }

        return counts.Select(pair => new Measurement<long>(pair.Value, new KeyValuePair<string, object?>("transport", pair.Key.Transport),
            new KeyValuePair<string, object?>("tls", pair.Key.Tls ? "true" : "false")));
    }
}
