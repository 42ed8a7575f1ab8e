using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Console;

namespace Spindle.Cli.Hosting;

/// <summary>
/// Console logging on standard error (standard output stays clean for scripts), one line per event: timestamped text in
/// a terminal, journald's priority-prefixed lines under systemd.
/// </summary>
internal static class CliLogging
{
    public static ILoggerFactory Create(LogLevel level) => LoggerFactory.Create(builder =>
    {
        builder.SetMinimumLevel(level);
        if (UnderJournal)
        {
            // journald's stream format: "<6>category[event] message", the syslog priority in angle brackets and no
            // timestamp (the journal adds its own; two would be doubled in journalctl's output).
            builder.AddSystemdConsole(options =>
            {
                options.TimestampFormat = null;
                options.IncludeScopes = false;
            });
        }
        else
        {
            builder.AddSimpleConsole(options =>
            {
                options.SingleLine = true;
                options.TimestampFormat = "yyyy-MM-dd HH:mm:ss.fff ";
                options.ColorBehavior = LoggerColorBehavior.Disabled;
            });
        }

        builder.AddConsole(options => options.LogToStandardErrorThreshold = LogLevel.Trace);
    });

    /// <summary>
    /// True when standard error goes to the journal: systemd sets JOURNAL_STREAM (device:inode of the stream) for a
    /// service whose output it connects there. SPINDLE_LOG_FORMAT=journal or text overrides the guess.
    /// </summary>
    public static bool UnderJournal => Environment.GetEnvironmentVariable("SPINDLE_LOG_FORMAT") switch
    {
        "journal" => true,
        "text" => false,
        _ => !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("JOURNAL_STREAM")),
    };

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
