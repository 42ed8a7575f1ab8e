using System.CommandLine;
using System.Globalization;
using System.Net.Sockets;
using Spindle.Cli.Hosting;
using Spindle.Client;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>What the client commands (info, copy, dump) share: error reporting, sizes, URIs.</summary>
internal static class ClientCommandSupport
{
    /// <summary>Runs a command body, turning every expected failure into "spindle: error: ..." and its exit code.</summary>
    public static async Task<int> RunAsync(Func<Task<int>> body, CancellationToken cancellationToken)
    {
        try
        {
            return await body().ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            return CliErrors.Fail("interrupted");
        }
        catch (FormatException exception)
        {
            return CliErrors.Usage(exception.Message);
        }
        catch (ConfigurationException exception)
        {
            return CliErrors.Usage(exception.Message);
        }
        catch (ArgumentException exception)
        {
            return CliErrors.Usage(Clean(exception));
        }
        catch (NotSupportedException exception)
        {
            return CliErrors.Fail(exception.Message);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException or TimeoutException or SocketException)
        {
            // NbdException is an IOException: connection, negotiation and server errors all land here.
            return CliErrors.Fail(exception.Message);
        }
        catch (BlockDeviceException exception)
        {
            // A device's failure (copy works on BlockDevice). NbdBlockDevice wraps the client's exceptions, whose
            // messages already name the request and the server; a file's says the operation, offset and path.
            return CliErrors.Fail(exception.InnerException is NbdException or TimeoutException ? exception.InnerException.Message : exception.Message);
        }
    }

    /// <summary>An argument exception's message without the " (Parameter 'x')" suffix .NET appends.</summary>
    public static string Clean(ArgumentException exception)
    {
        var message = exception.Message;
        if (exception.ParamName is { } name)
        {
            message = message.Replace($" (Parameter '{name}')", string.Empty, StringComparison.Ordinal);
        }

        if (exception is ArgumentOutOfRangeException { ActualValue: not null } outOfRange)
        {
            message = message.Replace($"{Environment.NewLine}Actual value was {outOfRange.ActualValue}.", string.Empty, StringComparison.Ordinal);
        }

        return message;
    }

    /// <summary>Parses a byte count with an optional K/M/G/T suffix (powers of 1024).</summary>
    public static long ParseSize(string text, string option)
    {
        if (!SizeParser.TryParse(text, out var size) || size < 0)
        {
            throw new FormatException($"{option}: '{text}' is not a size (examples: 4096, 512K, 64M, 1G)");
        }

        return size;
    }

    /// <summary>1536 → "1.5 KiB".</summary>
    public static string Human(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        double value = bytes;
        var unit = 0;
        while (Math.Abs(value) >= 1024 && unit < units.Length - 1)
        {
            value /= 1024;
            unit++;
        }

        return unit == 0
            ? string.Create(CultureInfo.InvariantCulture, $"{bytes} B")
            : string.Create(CultureInfo.InvariantCulture, $"{value:0.0} {units[unit]}");
    }

    /// <summary>
    /// Client options for the command-line tools: the usual timeouts, reconnection for
    /// <paramref name="deadTimeout"/> (default: the library's), and lost and regained connections reported on
    /// standard error.
    /// </summary>
    public static NbdClientOptions Options(int connections = 1, bool listContexts = false, string? context = null, TimeSpan? deadTimeout = null)
    {
        var options = new NbdClientOptions { Connections = connections, ListMetaContexts = listContexts, LoggerFactory = ReconnectReporter.Factory };
        if (deadTimeout is { } timeout)
        {
            options.DeadConnectionTimeout = timeout;
        }

        if (context is not null && !options.MetaContexts.Contains(context))
        {
            options.MetaContexts.Add(context);
        }

        return options;
    }

    /// <summary>The --dead-timeout option every client command takes (parsed by <see cref="ParseDeadTimeout"/>).</summary>
    public static Option<string?> DeadTimeoutOption(string? description = null) => new("--dead-timeout")
    {
        Description = description ?? "Seconds to wait for a lost server to come back (requests wait and are sent again), 0 to fail at once, or 'never' to wait forever [default: 300].",
    };

    /// <summary>Parses --dead-timeout: seconds, 0, or never.</summary>
    public static TimeSpan? ParseDeadTimeout(string? text)
    {
        if (text is null)
        {
            return null;
        }

        if (text is "never" or "infinite" or "inf")
        {
            return Timeout.InfiniteTimeSpan;
        }

        if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var seconds) || seconds < 0 || seconds > 1e7)
        {
            throw new FormatException($"--dead-timeout '{text}': give seconds (0 fails at once) or never");
        }

        return TimeSpan.FromSeconds(seconds);
    }
}

/// <summary>
/// Shows the client's reconnection events (connection lost, reconnected, retrying, given up) on standard error as
/// "spindle: ..." lines, and nothing else, so the tools' output stays as scripts expect it.
/// </summary>
internal sealed class ReconnectReporter : Microsoft.Extensions.Logging.ILoggerProvider, Microsoft.Extensions.Logging.ILogger
{
    /// <summary>The client's event ids for a lost connection (112), a reconnection (113), a failed retry (114), the dead-connection timeout (115) and a path down (116).</summary>
    private static readonly HashSet<int> Reported = [112, 113, 114, 115, 116];

    public static Microsoft.Extensions.Logging.ILoggerFactory Factory { get; } = new Microsoft.Extensions.Logging.LoggerFactory([new ReconnectReporter()]);

    public Microsoft.Extensions.Logging.ILogger CreateLogger(string categoryName) => this;

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => logLevel >= Microsoft.Extensions.Logging.LogLevel.Warning;

    public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        ArgumentNullException.ThrowIfNull(formatter);
        if (Reported.Contains(eventId.Id))
        {
            Console.Error.WriteLine("spindle: " + formatter(state, exception));
        }
    }

    public void Dispose()
    {
    }
}
