using System.Collections.Concurrent;
using System.Diagnostics.Metrics;

namespace Spindle.Client;

/// <summary>
/// The client's instruments (System.Diagnostics.Metrics, meter <see cref="MeterName"/>), read from every open
/// <see cref="NbdClient"/> when someone collects: nothing is added to the request path. Each series is tagged with the
/// client's <c>target</c> (the first path's host and port, or socket).
/// </summary>
public static class ClientMetrics
{
    /// <summary>The meter's name, for a MeterListener or an exporter's filter.</summary>
    public const string MeterName = "Spindle.Client";

    private static readonly ConcurrentDictionary<NbdClient, byte> Clients = new();
    private static readonly Meter Meter = CreateMeter();

    /// <summary>Instruments exist from the first client on; this makes sure they are created.</summary>
    public static string Name => Meter.Name;

    /// <summary>The clients open in this process now (for a status page).</summary>
    public static IReadOnlyList<NbdClient> OpenClients => [.. Clients.Keys];

    internal static void Register(NbdClient client)
    {
        _ = Meter;
        Clients.TryAdd(client, 0);
    }

    internal static void Unregister(NbdClient client) => Clients.TryRemove(client, out _);

    private static Meter CreateMeter()
    {
        var meter = new Meter(MeterName, typeof(ClientMetrics).Assembly.GetName().Version?.ToString());
        meter.CreateObservableCounter("spindle.client.reconnections", () => Each(client => client.Reconnections), "{connection}",
            "Connections re-established after one was lost.");
        meter.CreateObservableCounter("spindle.client.replayed_requests", () => Each(client => client.ResentRequests), "{request}",
            "Requests sent again because the connection they were on was lost before answering.");
        meter.CreateObservableCounter("spindle.client.blocked.duration", () => Each(client => client.BlockedTime.TotalSeconds), "s",
            "Time with no working connection at all (requests wait meanwhile).");
        meter.CreateObservableUpDownCounter("spindle.client.paths", ObservePaths, "{path}",
            "Paths (servers of a multipath URI) with at least one working connection (state=up) and without (state=down).");
        meter.CreateObservableUpDownCounter("spindle.client.requests.unacknowledged", () => Each(client => (long)client.UnacknowledgedCount), "{request}",
            "Requests submitted and not yet answered.");
        return meter;
    }

    private static IEnumerable<Measurement<T>> Each<T>(Func<NbdClient, T> read)
        where T : struct =>
        [.. Clients.Keys.Select(client => new Measurement<T>(read(client), new KeyValuePair<string, object?>("target", client.Uri.Target)))];

    private static IEnumerable<Measurement<long>> ObservePaths()
    {
        var measurements = new List<Measurement<long>>();
        foreach (var client in Clients.Keys)
        {
            var status = client.PathStatus;
            var up = status.Count(path => path.Connections > 0);
            var target = new KeyValuePair<string, object?>("target", client.Uri.Target);
            measurements.Add(new Measurement<long>(up, target, new KeyValuePair<string, object?>("state", "up")));
            measurements.Add(new Measurement<long>(status.Count - up, target, new KeyValuePair<string, object?>("state", "down")));
        }

        return measurements;
    }
}
