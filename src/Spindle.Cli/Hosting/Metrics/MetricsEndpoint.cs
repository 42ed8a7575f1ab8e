using System.Globalization;
using System.Net;
using System.Text;
using Microsoft.Extensions.Logging;
using Prometheus;

namespace Spindle.Cli.Hosting.Metrics;

/// <summary>
/// <c>--metrics ADDR:PORT</c>: a small HTTP server (System.Net.HttpListener) with Prometheus' text format at
/// <c>/metrics</c> (written by prometheus-net from <see cref="PrometheusBridge"/>) and a status page at <c>/</c>. It runs
/// beside the NBD server on its own threads; a scrape reads the counters, it never touches a request.
/// </summary>
internal sealed class MetricsEndpoint : IAsyncDisposable
{
    private readonly HttpListener _listener = new();
    private readonly PrometheusBridge _bridge;
    private readonly Func<string> _statusPage;
    private readonly ILogger _logger;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;

    private MetricsEndpoint(string prefix, PrometheusBridge bridge, Func<string> statusPage, ILogger logger)
    {
        _bridge = bridge;
        _statusPage = statusPage;
        _logger = logger;
        _listener.Prefixes.Add(prefix);
        _listener.Start();
        Url = prefix;
        _loop = Task.Run(ServeAsync);
    }

    /// <summary>The URL served, e.g. http://127.0.0.1:9100/.</summary>
    public string Url { get; }

    /// <summary>Starts serving on <paramref name="address"/> (ADDR:PORT, [IPv6]:PORT, or :PORT for every address).</summary>
    public static MetricsEndpoint Start(string address, Func<string> statusPage, ILogger logger, params string[] meters)
    {
        var prefix = ParsePrefix(address);
        var bridge = new PrometheusBridge(meters);
        try
        {
            return new MetricsEndpoint(prefix, bridge, statusPage, logger);
        }
        catch (HttpListenerException exception)
        {
            bridge.Dispose();
            throw new IOException($"--metrics {address}: cannot listen: {exception.Message}", exception);
        }
    }

    /// <summary>ADDR:PORT to an HttpListener prefix; the port is required (HttpListener cannot pick one).</summary>
    internal static string ParsePrefix(string address)
    {
        var colon = address.LastIndexOf(':');
        if (colon < 0 || !int.TryParse(address.AsSpan(colon + 1), NumberStyles.None, CultureInfo.InvariantCulture, out var port) || port is < 1 or > 65535)
        {
            throw new ConfigurationException($"--metrics '{address}' must be ADDR:PORT (for example 127.0.0.1:9100, [::1]:9100 or :9100 for every address)");
        }

        var host = address[..colon];
        if (host.Length == 0 || host is "*" or "0.0.0.0" or "[::]")
        {
            // HttpListener's "+" is every address.
            host = "+";
        }
        else if (!host.StartsWith('[') && IPAddress.TryParse(host, out var ip) && ip.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6)
        {
            host = $"[{host}]";
        }
        else if (host != "localhost" && !IPAddress.TryParse(host.Trim('[', ']'), out _))
        {
            throw new ConfigurationException($"--metrics '{address}': '{host}' is not an IP address");
        }

        return $"http://{host}:{port.ToString(CultureInfo.InvariantCulture)}/";
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        _listener.Close();
        try
        {
            await _loop.ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is HttpListenerException or ObjectDisposedException or OperationCanceledException)
        {
        }

        _bridge.Dispose();
        _stop.Dispose();
    }

    private async Task ServeAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            HttpListenerContext context;
            try
            {
                context = await _listener.GetContextAsync().ConfigureAwait(false);
            }
            catch (Exception exception) when (exception is HttpListenerException or ObjectDisposedException or InvalidOperationException)
            {
                return;
            }

            _ = Task.Run(() => AnswerAsync(context));
        }
    }

    private async Task AnswerAsync(HttpListenerContext context)
    {
        var response = context.Response;
        try
        {
            var path = context.Request.Url?.AbsolutePath ?? "/";
            if (context.Request.HttpMethod is not ("GET" or "HEAD"))
            {
                response.StatusCode = 405;
            }
            else if (path == "/metrics")
            {
                response.ContentType = PrometheusConstants.TextContentTypeWithVersionAndEncoding;
                using var buffer = new MemoryStream();
                await _bridge.Registry.CollectAndExportAsTextAsync(buffer, _stop.Token).ConfigureAwait(false);
                response.ContentLength64 = buffer.Length;
                buffer.Position = 0;
                await buffer.CopyToAsync(response.OutputStream, _stop.Token).ConfigureAwait(false);
            }
            else if (path == "/")
            {
                var page = Encoding.UTF8.GetBytes(_statusPage());
                response.ContentType = "text/html; charset=utf-8";
                response.Headers["Cache-Control"] = "no-store";
                response.ContentLength64 = page.Length;
                await response.OutputStream.WriteAsync(page, _stop.Token).ConfigureAwait(false);
            }
            else
            {
                response.StatusCode = 404;
            }
        }
        catch (Exception exception) when (exception is HttpListenerException or IOException or ObjectDisposedException or OperationCanceledException)
        {
            MetricsLog.AnswerFailed(_logger, exception.Message);
        }
        finally
        {
            try
            {
                response.Close();
            }
            catch (Exception exception) when (exception is HttpListenerException or ObjectDisposedException or IOException)
            {
            }
        }
    }
}

internal static partial class MetricsLog
{
    [LoggerMessage(EventId = 300, Level = LogLevel.Debug, Message = "Metrics endpoint: a request failed: {Reason}")]
    public static partial void AnswerFailed(ILogger logger, string reason);

    [LoggerMessage(EventId = 301, Level = LogLevel.Information, Message = "Metrics at {Url}metrics, status page at {Url}")]
    public static partial void Serving(ILogger logger, string url);
}
