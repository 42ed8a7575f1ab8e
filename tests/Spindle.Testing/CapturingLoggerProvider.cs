using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace Spindle.Testing;

/// <summary>Keeps every log line so a test can assert that a refusal was logged with the client's address.</summary>
public sealed class CapturingLoggerProvider : ILoggerProvider, ILoggerFactory
{
    private readonly ConcurrentQueue<string> _lines = new();

    public IReadOnlyCollection<string> Lines => _lines.ToArray();

    /// <summary>Echo lines to this sink too (for example the test's output).</summary>
    public Action<string>? Echo { get; set; }

    public bool Contains(string fragment) => _lines.Any(line => line.Contains(fragment, StringComparison.Ordinal));

    /// <summary>Waits (boundedly) for a line containing all fragments; log lines are written asynchronously to a request.</summary>
    public async Task<string> WaitForAsync(TimeSpan timeout, params string[] fragments)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var line = _lines.FirstOrDefault(l => fragments.All(f => l.Contains(f, StringComparison.Ordinal)));
            if (line is not null)
            {
                return line;
            }

            if (DateTime.UtcNow > deadline)
            {
                Xunit.Assert.Fail($"no log line containing [{string.Join(", ", fragments)}] within {timeout.TotalSeconds} s; got:\n{string.Join('\n', _lines)}");
            }

            await Task.Delay(20);
        }
    }

    public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);

    public void AddProvider(ILoggerProvider provider)
    {
    }

    public void Dispose()
    {
    }

    private sealed class Logger(CapturingLoggerProvider owner, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => true;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            var line = $"{logLevel} {category}[{eventId.Id}] {formatter(state, exception)}{(exception is null ? "" : " " + exception)}";
            owner._lines.Enqueue(line);
            owner.Echo?.Invoke(line);
        }
    }
}
