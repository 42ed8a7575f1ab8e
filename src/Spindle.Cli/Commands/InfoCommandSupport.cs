using System.Globalization;
using System.Net.Sockets;
using Spindle.Cli.Hosting;
using Spindle.Client;
using Spindle.Server.Configuration;

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

    /// <summary>Client options for the command-line tools: quiet logs, the usual timeouts.</summary>
    public static NbdClientOptions Options(int connections = 1, bool listContexts = false, string? context = null)
    {
        var options = new NbdClientOptions { Connections = connections, ListMetaContexts = listContexts };
        if (context is not null && !options.MetaContexts.Contains(context))
        {
            options.MetaContexts.Add(context);
        }

        return options;
    }
}
