using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Console;

namespace Spindle.Cli.Hosting;

/// <summary>Console logging on standard error (standard output stays clean for scripts), one line per event.</summary>
internal static class CliLogging
{
    public static ILoggerFactory Create(LogLevel level) => LoggerFactory.Create(builder =>
    {
        builder.SetMinimumLevel(level);
        builder.AddSimpleConsole(options =>
        {
            options.SingleLine = true;
            options.TimestampFormat = "yyyy-MM-dd HH:mm:ss.fff ";
            options.ColorBehavior = LoggerColorBehavior.Disabled;
        });
        builder.AddConsole(options => options.LogToStandardErrorThreshold = LogLevel.Trace);
    });

    public static bool TryParseLevel(string? text, out LogLevel level)
    {
        level = LogLevel.Information;
        switch (text?.ToLowerInvariant())
        {
            case null or "" or "info" or "information":
                return true;
            case "trace":
                level = LogLevel.Trace;
                return true;
            case "debug":
                level = LogLevel.Debug;
                return true;
            case "warn" or "warning":
                level = LogLevel.Warning;
                return true;
            case "error":
                level = LogLevel.Error;
                return true;
            case "none" or "quiet":
                level = LogLevel.None;
                return true;
            default:
                return false;
        }
    }
}
