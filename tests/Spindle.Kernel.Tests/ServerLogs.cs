using Spindle.Testing;
using Xunit;

namespace Spindle.Kernel.Tests;

/// <summary>What the in-process server logged about the kernel's connections.</summary>
internal static class ServerLogs
{
    /// <summary>
    /// Waits (at most 10 s) until <paramref name="expected"/> connections have closed with NBD_CMD_DISC, and returns
    /// every log line.
    /// </summary>
    public static async Task<IReadOnlyCollection<string>> WaitForDisconnectsAsync(this TestServer server, int expected)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (server.Logs.Lines.Count(l => l.Contains("closed (NBD_CMD_DISC)", StringComparison.Ordinal)) < expected)
        {
            Assert.True(DateTime.UtcNow < deadline, $"fewer than {expected} connections ended with NBD_CMD_DISC:\n{string.Join('\n', server.Logs.Lines)}");
            await Task.Delay(50);
        }

        return server.Logs.Lines;
    }

    /// <summary>Fails if the server refused a request or the backend failed one.</summary>
    public static void AssertNoErrorReplies(IReadOnlyCollection<string> logs) =>
        Assert.DoesNotContain(logs, l => l.Contains("refused with", StringComparison.Ordinal) || l.Contains("failed with", StringComparison.Ordinal));
}
