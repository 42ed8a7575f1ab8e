using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace Spindle.Fuzz.Support;

/// <summary>
/// Keeps every log line of one run, so a target can fail when the code under test logged an error (the server logs an
/// unexpected exception as "connection failed" at Error level).
/// </summary>
internal sealed class CapturingLogs : ILoggerFactory, ILoggerProvider
{
    private readonly ConcurrentQueue<(LogLevel Level, string Line)> _lines = new();

    public IEnumerable<string> AtLeast(LogLevel level) => _lines.Where(entry => entry.Level >= level).Select(entry => entry.Line);

    public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);

    public void AddProvider(ILoggerProvider provider)
    {
    }

    public void Dispose()
    {
    }

    private sealed class Logger(CapturingLogs owner, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Information;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            owner._lines.Enqueue((logLevel, $"{logLevel} {category}[{eventId.Id}] {formatter(state, exception)}{(exception is null ? string.Empty : " " + exception)}"));
        }
    }
}
