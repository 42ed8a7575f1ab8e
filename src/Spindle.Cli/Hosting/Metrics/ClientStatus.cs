using System.Globalization;
using System.Net;
using System.Text;
using Microsoft.Extensions.Logging;
using Spindle.Client;

namespace Spindle.Cli.Hosting.Metrics;

/// <summary>
/// <c>spindle mount|attach --metrics ADDR:PORT</c>: the client's instruments (meter Spindle.Client: reconnections,
/// replayed requests, time blocked, paths up and down) in Prometheus' format, and a status page listing each open
/// client with its paths.
/// </summary>
internal sealed class ClientStatus : IAsyncDisposable
{
    private readonly MetricsEndpoint _endpoint;

    private ClientStatus(MetricsEndpoint endpoint)
    {
        _endpoint = endpoint;
    }

    /// <summary>Starts the endpoint; null (and nothing started) without an address.</summary>
    public static ClientStatus? Start(string? address, ILogger logger)
    {
        if (address is null)
        {
            return null;
        }

        var endpoint = MetricsEndpoint.Start(address, Render, logger, ClientMetrics.MeterName);
        MetricsLog.Serving(logger, endpoint.Url);
        return new ClientStatus(endpoint);
    }

    public ValueTask DisposeAsync() => _endpoint.DisposeAsync();

    private static string Render()
    {
        var html = new StringBuilder("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\"><title>Spindle client status</title></head><body>\n<h1>Spindle client</h1>\n");
        html.Append("<table id=\"clients\" border=\"1\"><thead><tr><th>Export</th><th>Paths up</th><th>Paths down</th><th>Reconnections</th><th>Replayed requests</th><th>Time blocked</th><th>Unacknowledged</th></tr></thead><tbody>\n");
        foreach (var client in ClientMetrics.OpenClients)
        {
            var paths = client.PathStatus;
            var up = paths.Count(path => path.Connections > 0);
            html.Append(CultureInfo.InvariantCulture, $"<tr><td>{WebUtility.HtmlEncode(client.Uri.ToString())}</td><td>{up}</td><td>{paths.Count - up}</td><td>{client.Reconnections}</td><td>{client.ResentRequests}</td><td>{client.BlockedTime.TotalSeconds:0.0} s</td><td>{client.UnacknowledgedCount}</td></tr>\n");
        }

        html.Append("</tbody></table>\n<p>Prometheus metrics: <a href=\"/metrics\">/metrics</a></p></body></html>\n");
        return html.ToString();
    }
}
