namespace Spindle.Cli.Hosting;

/// <summary>Consistent error output: "spindle: error: ..." on standard error, and the exit code.</summary>
internal static class CliErrors
{
    /// <summary>Exit code for an operation that failed (I/O, network, refused by the server).</summary>
    public const int Failure = 1;

    /// <summary>Exit code for a command line or configuration that cannot be used.</summary>
    public const int UsageError = 2;

    public static int Fail(string message)
    {
        Console.Error.WriteLine($"spindle: error: {message}");
        return Failure;
    }

    public static int Usage(string message)
    {
        Console.Error.WriteLine($"spindle: error: {message}");
        return UsageError;
    }
}
