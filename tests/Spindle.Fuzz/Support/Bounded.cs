namespace Spindle.Fuzz.Support;

/// <summary>
/// Runs the asynchronous part of a target to completion on the calling thread, within a time bound: a run that does
/// not finish is a hang, reported as an <see cref="InvariantViolation"/> (so AFL++ keeps the input as a crash with a
/// message, rather than only as a timeout).
/// </summary>
internal static class Bounded
{
    /// <summary>Generous for one in-memory exchange even on an instrumented, loaded two-core machine.</summary>
    public static readonly TimeSpan Limit = TimeSpan.FromSeconds(5);

    public static void Run(Func<CancellationToken, Task> body, string what)
    {
        using var deadline = new CancellationTokenSource(Limit);
        var task = body(deadline.Token);
        try
        {
            if (!task.Wait(Limit + TimeSpan.FromSeconds(1)))
            {
                throw new InvariantViolation($"{what} did not finish within {Limit.TotalSeconds:0} s (a hang)");
            }
        }
        catch (AggregateException aggregate) when (aggregate.InnerExceptions.Count == 1)
        {
            if (aggregate.InnerException is OperationCanceledException && deadline.IsCancellationRequested)
            {
                throw new InvariantViolation($"{what} did not finish within {Limit.TotalSeconds:0} s (a hang)", aggregate.InnerException);
            }

            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(aggregate.InnerException!).Throw();
        }
    }

    /// <summary>Awaits <paramref name="task"/> but gives up, as a hang, when <paramref name="token"/> fires.</summary>
    public static async Task Within(Task task, string what, CancellationToken token)
    {
        try
        {
            await task.WaitAsync(token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (token.IsCancellationRequested && !task.IsCompleted)
        {
            throw new InvariantViolation($"{what} did not finish within {Limit.TotalSeconds:0} s (a hang)");
        }
    }

    /// <summary>Reads <paramref name="stream"/> to its end (the peer closed), within the bound.</summary>
    public static async Task<byte[]> ReadToEndAsync(Stream stream, string what, CancellationToken token)
    {
        var output = new MemoryStream();
        try
        {
            await stream.CopyToAsync(output, token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (token.IsCancellationRequested)
        {
            throw new InvariantViolation($"{what} did not close within {Limit.TotalSeconds:0} s (a hang); it sent {output.Length} bytes");
        }

        return output.ToArray();
    }
}
