using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Spindle.Cli.Hosting.Control;
using Spindle.Cli.Hosting.Metrics;
using Spindle.Cli.Hosting.Systemd;
using Spindle.Client;
using Spindle.Server;
using Spindle.Server.Diagnostics;
using Spindle.Server.Exports;

namespace Spindle.Cli.Hosting;

/// <summary>What <c>spindle serve</c> was asked for beyond the configuration itself.</summary>
internal sealed class HostOptions
{
    /// <summary>The configuration file a reload re-reads; null when the exports came from the command line.</summary>
    public string? ConfigFile { get; init; }

    /// <summary>Command-line overrides a reload must apply again (-r applies to every export of the file).</summary>
    public bool ForceReadOnly { get; init; }

    public bool PrintUri { get; init; }

    public string? PidFile { get; init; }

    /// <summary>ADDR:PORT of the metrics endpoint (overrides the file's <c>metrics</c>).</summary>
    public string? Metrics { get; init; }

    /// <summary>The control socket's path (overrides the file's <c>control_socket</c>).</summary>
    public string? ControlSocket { get; init; }
}

/// <summary>
/// The running <c>spindle serve</c>: builds the catalog from a configuration, starts the server on the configured or
/// systemd-passed sockets, writes the pid file, starts the metrics endpoint and the control socket, drops privileges,
/// tells systemd it is ready, and then reacts: SIGHUP and <c>spindle ctl reload</c> re-read the configuration,
/// <c>spindle ctl</c> adds, changes and removes exports, SIGINT and SIGTERM stop gracefully.
/// </summary>
internal sealed partial class ServerHost : IAsyncDisposable
{
    private readonly HostOptions _options;
    private readonly ILoggerFactory _loggerFactory;
    private readonly ILogger _logger;
    private readonly ExportCatalog _catalog;
    private readonly SemaphoreSlim _changes = new(1, 1);
    private readonly Dictionary<string, ExportDefinition> _definitions = new(StringComparer.Ordinal);
    private readonly DateTimeOffset _started = DateTimeOffset.UtcNow;
    private ServerConfiguration _configuration;
    private NbdServer? _server;
    private SystemdNotifier? _notifier;
    private Timer? _statusTimer;

    public ServerHost(ServerConfiguration configuration, HostOptions options, ILoggerFactory loggerFactory)
    {
        _configuration = configuration;
        _options = options;
        _loggerFactory = loggerFactory;
        _logger = loggerFactory.CreateLogger("Spindle");
        BackendFactory.Logging = loggerFactory;
        _catalog = new ExportCatalog { DefaultExportName = configuration.DefaultExport, ListAliases = configuration.ListAliases };
    }

    private NbdServer Server => _server ?? throw new InvalidOperationException("the server has not started");

    /// <summary>Runs until SIGINT or SIGTERM; the exit code.</summary>
    public async Task<int> RunAsync()
    {
        foreach (var warning in _configuration.Warnings)
        {
            HostLog.ConfigurationWarning(_logger, warning);
        }

        PrivilegeDrop? drop;
        IReadOnlyList<ListenEndpoint.Inherited> inherited;
        try
        {
            drop = PrivilegeDrop.Resolve(_configuration.User, _configuration.Group, _configuration.UserSource ?? "configuration");
            inherited = SocketActivation.TakeFromEnvironment();
        }
        catch (ConfigurationException exception)
        {
            return CliErrors.Usage(exception.Message);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException or ArgumentException)
        {
            return CliErrors.Fail(exception.Message);
        }

        try
        {
            // An export that cannot be opened (a missing or corrupt image, an unreachable RBD pool) is a failure, not
            // a usage error, whatever exception type reports it.
            await OpenExportsAsync(_configuration).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is ConfigurationException or IOException or UnauthorizedAccessException or ArgumentException or DirectoryNotFoundException)
        {
            return CliErrors.Fail(exception.Message);
        }

        if (inherited.Count > 0)
        {
            // Socket activation: the .socket unit decides where to listen; the file's listening keys do not apply.
            _configuration.Server.Endpoints.Clear();
            foreach (var socket in inherited)
            {
                _configuration.Server.Endpoints.Add(socket);
            }

            HostLog.SocketActivated(_logger, inherited.Count, string.Join(", ", inherited.Select(s => s.Name)));
        }

        try
        {
            _server = new NbdServer(_configuration.Server, _catalog, _loggerFactory);
            _server.Start();
        }
        catch (Exception exception) when (exception is IOException or ArgumentException)
        {
            return CliErrors.Fail(exception.Message);
        }

        using var pidFile = _options.PidFile is { } pidPath ? PidFile.Write(pidPath) : null;
        MetricsEndpoint? metrics = null;
        ControlServer? control = null;
        try
        {
            if ((_options.Metrics ?? _configuration.MetricsAddress) is { } metricsAddress)
            {
                metrics = MetricsEndpoint.Start(metricsAddress, RenderStatusPage, _logger, ServerMetrics.MeterName, ClientMetrics.MeterName);
                MetricsLog.Serving(_logger, metrics.Url);
            }

            if ((_options.ControlSocket ?? _configuration.ControlSocket) is { } controlPath)
            {
                control = ControlServer.Start(controlPath, this, drop, _logger);
            }

            if (drop is not null && !drop.IsCurrent)
            {
                drop.Apply();
                HostLog.PrivilegesDropped(_logger, drop.ToString());
            }
        }
        catch (ConfigurationException exception)
        {
            await StopEverythingAsync(metrics, control).ConfigureAwait(false);
            return CliErrors.Usage(exception.Message);
        }
        catch (Exception exception) when (exception is IOException or InvalidOperationException or UnauthorizedAccessException or SocketException)
        {
            await StopEverythingAsync(metrics, control).ConfigureAwait(false);
            return CliErrors.Fail(exception.Message);
        }

        AnnounceListening();
        _notifier = SystemdNotifier.FromEnvironment();
        _notifier.Ready(StatusLine());
        _statusTimer = new Timer(_ => Tick(), null, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(1));
        using var stop = new ShutdownSignal(_logger);

        // SIGHUP re-reads the configuration, as nbd-server and most daemons do.
        using var hangup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, context =>
        {
            context.Cancel = true;
            _ = Task.Run(() => ReloadAsync("SIGHUP"));
        });

        // SIGUSR1 cuts every client connection (the server keeps listening): clients that reconnect carry on.
        using var cut = PosixSignalRegistration.Create((PosixSignal)10, context =>
        {
            context.Cancel = true;
            HostLog.CutConnections(_logger, Server.DisconnectAll());
        });
        await stop.WaitAsync().ConfigureAwait(false);
        _notifier.Stopping();
        HostLog.Stopping(_logger);
        await StopEverythingAsync(metrics, control).ConfigureAwait(false);
        HostLog.Stopped(_logger);
        return 0;
    }

    public async ValueTask DisposeAsync()
    {
        if (_statusTimer is not null)
        {
            await _statusTimer.DisposeAsync().ConfigureAwait(false);
        }

        if (_server is not null)
        {
            await _server.DisposeAsync().ConfigureAwait(false);
        }

        await _catalog.DisposeAsync().ConfigureAwait(false);
        _notifier?.Dispose();
        _changes.Dispose();
    }

    private async Task StopEverythingAsync(MetricsEndpoint? metrics, ControlServer? control)
    {
        if (control is not null)
        {
            await control.DisposeAsync().ConfigureAwait(false);
        }

        if (_server is not null)
        {
            await _server.StopAsync().ConfigureAwait(false);
        }

        if (metrics is not null)
        {
            await metrics.DisposeAsync().ConfigureAwait(false);
        }
    }

    /// <summary>Once a second: rates for the status page, and systemd's STATUS= line when it changed.</summary>
    private void Tick()
    {
        SampleRates();
        _notifier?.Status(StatusLine());
    }

    /// <summary>The one-line status systemctl status shows.</summary>
    private string StatusLine()
    {
        var connections = _server?.ConnectionCount ?? 0;
        var exports = _catalog.Exports.Count;
        return $"Serving {exports} export{(exports == 1 ? "" : "s")} to {connections} connection{(connections == 1 ? "" : "s")}";
    }

    private void AnnounceListening()
    {
        foreach (var export in _catalog.Exports)
        {
            HostLog.Serving(_logger, export.ToString());
        }

        foreach (var served in _catalog.Directories)
        {
            HostLog.ServingDirectory(_logger, served.Options.Root, served.Options.Prefix.Length == 0 ? string.Empty : served.Options.Prefix + "/", served.Options.Template.ReadOnly ? ", read-only" : string.Empty);
        }

        // With only directories served, the URI names the server; clients add an image's relative path.
        var names = _catalog.Exports.Count > 0 ? _catalog.Exports.Select(export => export.Name).ToList() : [string.Empty];
        var uris = Server.LocalEndPoints.SelectMany(endpoint => names.Select(name => UriFor(endpoint, name))).ToList();
        foreach (var uri in uris)
        {
            HostLog.ClientsConnectTo(_logger, uri);
        }

        if (_options.PrintUri && uris.Count > 0)
        {
            Console.Out.WriteLine(uris[0]);
            Console.Out.Flush();
        }
    }

    private static string UriFor(EndPoint endpoint, string exportName)
    {
        var path = Uri.EscapeDataString(exportName);
        return endpoint switch
        {
            UnixDomainSocketEndPoint unix => $"nbd+unix:///{path}?socket={unix}",
            IPEndPoint ip when ip.Address.Equals(IPAddress.IPv6Any) || ip.Address.Equals(IPAddress.Any) => $"nbd://localhost:{ip.Port}/{path}",
            IPEndPoint { AddressFamily: AddressFamily.InterNetworkV6 } ip => $"nbd://[{ip.Address}]:{ip.Port}/{path}",
            IPEndPoint ip => $"nbd://{ip.Address}:{ip.Port}/{path}",
            _ => endpoint.ToString() ?? string.Empty,
        };
    }

    /// <summary>SIGINT and SIGTERM begin a graceful stop; a second one exits at once.</summary>
    private sealed class ShutdownSignal : IDisposable
    {
        private readonly TaskCompletionSource _signalled = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly PosixSignalRegistration _interrupt;
        private readonly PosixSignalRegistration _terminate;
        private readonly ILogger _logger;
        private long _first;

        public ShutdownSignal(ILogger logger)
        {
            _logger = logger;
            _interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle);
            _terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle);
        }

        public Task WaitAsync() => _signalled.Task;

        public void Dispose()
        {
            _interrupt.Dispose();
            _terminate.Dispose();
        }

        private void Handle(PosixSignalContext context)
        {
            context.Cancel = true;
            var now = Environment.TickCount64;
            if (_signalled.TrySetResult())
            {
                _first = now;
                return;
            }

            // timeout(1) and some supervisors signal both the process and its group: a duplicate within a second is
            // the same request, not a user insisting.
            if (now - _first < 1000)
            {
                return;
            }

            HostLog.SecondSignal(_logger, context.Signal.ToString());
            Environment.Exit(130);
        }
    }
}

internal static partial class HostLog
{
    [LoggerMessage(EventId = 200, Level = LogLevel.Warning, Message = "{Warning}")]
    public static partial void ConfigurationWarning(ILogger logger, string warning);

    [LoggerMessage(EventId = 201, Level = LogLevel.Information, Message = "Socket activation: serving {Count} socket(s) passed by systemd ({Names})")]
    public static partial void SocketActivated(ILogger logger, int count, string names);

    [LoggerMessage(EventId = 202, Level = LogLevel.Information, Message = "Dropped privileges: now running as {Identity}")]
    public static partial void PrivilegesDropped(ILogger logger, string identity);

    [LoggerMessage(EventId = 203, Level = LogLevel.Warning, Message = "SIGUSR1: cut {Count} client connections")]
    public static partial void CutConnections(ILogger logger, int count);

    [LoggerMessage(EventId = 204, Level = LogLevel.Information, Message = "Stopping: finishing in-flight requests and flushing")]
    public static partial void Stopping(ILogger logger);

    [LoggerMessage(EventId = 205, Level = LogLevel.Information, Message = "Stopped")]
    public static partial void Stopped(ILogger logger);

    [LoggerMessage(EventId = 206, Level = LogLevel.Information, Message = "Serving export {Export}")]
    public static partial void Serving(ILogger logger, string export);

    [LoggerMessage(EventId = 207, Level = LogLevel.Information, Message = "Serving the images below {Root} as '{Prefix}<relative path>'{ReadOnly}")]
    public static partial void ServingDirectory(ILogger logger, string root, string prefix, string readOnly);

    [LoggerMessage(EventId = 208, Level = LogLevel.Information, Message = "Clients connect to {Uri}")]
    public static partial void ClientsConnectTo(ILogger logger, string uri);

    [LoggerMessage(EventId = 209, Level = LogLevel.Warning, Message = "Second {Signal}: exiting without waiting")]
    public static partial void SecondSignal(ILogger logger, string signal);

    [LoggerMessage(EventId = 210, Level = LogLevel.Information, Message = "Reload ({Trigger}): {Summary}")]
    public static partial void Reloaded(ILogger logger, string trigger, string summary);

    [LoggerMessage(EventId = 211, Level = LogLevel.Error, Message = "Reload ({Trigger}) refused, the running configuration is kept: {Reason}")]
    public static partial void ReloadRefused(ILogger logger, string trigger, string reason);

    [LoggerMessage(EventId = 212, Level = LogLevel.Warning, Message = "Reload: {What} changed; it applies at the next restart")]
    public static partial void NeedsRestart(ILogger logger, string what);

    [LoggerMessage(EventId = 213, Level = LogLevel.Information, Message = "Export '{Export}' {Change} ({Trigger})")]
    public static partial void ExportChanged(ILogger logger, string export, string change, string trigger);

    [LoggerMessage(EventId = 214, Level = LogLevel.Information, Message = "Connection {Id} disconnected by the control socket")]
    public static partial void Disconnected(ILogger logger, long id);

    [LoggerMessage(EventId = 215, Level = LogLevel.Debug, Message = "Export '{Export}' uuid {Uuid} ({Note})")]
    public static partial void ExportUuid(ILogger logger, string export, Guid uuid, string note);

    [LoggerMessage(EventId = 216, Level = LogLevel.Warning, Message = "{Image}: {Warning}")]
    public static partial void ImageWarning(ILogger logger, string image, string warning);

    [LoggerMessage(EventId = 217, Level = LogLevel.Information, Message = "Opened {Image}: {Details}")]
    public static partial void ImageOpened(ILogger logger, string image, string details);
}
