using System.Globalization;
using Xunit;

namespace Spindle.Kernel.Tests;

/// <summary>
/// What the guest printed on its serial console, parsed from the marker lines scripts/kernel-vm/init writes:
/// <c>@@spindle step NAME rc=N</c>, <c>@@spindle result KEY=VALUE</c>, <c>@@spindle booted SECONDS</c> and
/// <c>@@spindle done</c>. Every assertion failure carries the whole console.
/// </summary>
public sealed class VmReport
{
    private const string Marker = "@@spindle ";

    private readonly Dictionary<string, int> _steps = new(StringComparer.Ordinal);
    private readonly Dictionary<string, string> _results = new(StringComparer.Ordinal);

    public VmReport(int exitCode, string console, string errors, TimeSpan elapsed)
    {
        ExitCode = exitCode;
        Console = console.Replace("\r", string.Empty, StringComparison.Ordinal);
        Errors = errors;
        Elapsed = elapsed;
        foreach (var line in Console.Split('\n'))
        {
            // A line may start with firmware escape sequences; the marker can be anywhere in it.
            var at = line.IndexOf(Marker, StringComparison.Ordinal);
            if (at < 0)
            {
                continue;
            }

            var text = line[(at + Marker.Length)..].TrimEnd();
            if (text == "done")
            {
                Done = true;
            }
            else if (text.StartsWith("booted ", StringComparison.Ordinal) &&
                     double.TryParse(text["booted ".Length..], NumberStyles.Float, CultureInfo.InvariantCulture, out var seconds))
            {
                BootSeconds = seconds;
            }
            else if (text.StartsWith("step ", StringComparison.Ordinal))
            {
                var parts = text.Split(' ');
                if (parts.Length == 3 && parts[2].StartsWith("rc=", StringComparison.Ordinal) &&
                    int.TryParse(parts[2][3..], NumberStyles.Integer, CultureInfo.InvariantCulture, out var rc))
                {
                    _steps[parts[1]] = rc;
                }
            }
            else if (text.StartsWith("result ", StringComparison.Ordinal))
            {
                var pair = text["result ".Length..];
                var equals = pair.IndexOf('=', StringComparison.Ordinal);
                if (equals > 0)
                {
                    _results[pair[..equals]] = pair[(equals + 1)..];
                }
            }
        }
    }

    public int ExitCode { get; }

    public string Console { get; }

    /// <summary>run.sh's own messages (the accelerator chosen, a timeout).</summary>
    public string Errors { get; }

    public TimeSpan Elapsed { get; }

    /// <summary>The scenario ran to its end and the VM powered itself off.</summary>
    public bool Done { get; }

    /// <summary>Guest uptime when the scenario started.</summary>
    public double? BootSeconds { get; }

    /// <summary>Fails unless the scenario ran to its end and the VM powered off by itself.</summary>
    public void AssertCompleted() =>
        Assert.True(Done && ExitCode == 0, $"the VM did not finish its scenario (exit {ExitCode})\n{this}");

    /// <summary>Fails unless each named step ran and exited with 0.</summary>
    public void AssertSucceeded(params string[] steps)
    {
        foreach (var step in steps)
        {
            Assert.True(StepExitCode(step) == 0, $"step '{step}' failed in the guest\n{this}");
        }
    }

    /// <summary>The exit status of a step, or a failure if it never ran.</summary>
    public int StepExitCode(string step)
    {
        Assert.True(_steps.TryGetValue(step, out var rc), $"the guest never reported step '{step}'\n{this}");
        return rc;
    }

    /// <summary>A reported value, or a failure if the guest did not report it.</summary>
    public string Result(string key)
    {
        Assert.True(_results.TryGetValue(key, out var value), $"the guest never reported '{key}'\n{this}");
        return value!;
    }

    /// <summary>What a step printed (its lines, without their "[name] " prefix).</summary>
    public string StepOutput(string step)
    {
        var prefix = $"[{step}] ";
        return string.Join('\n', Console.Split('\n').Where(l => l.StartsWith(prefix, StringComparison.Ordinal)).Select(l => l[prefix.Length..]));
    }

    public long ResultInt64(string key)
    {
        var text = Result(key);
        Assert.True(long.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out var value), $"'{key}' is '{text}', not a number\n{this}");
        return value;
    }

    public override string ToString() => $"--- console ---\n{Console}\n--- run.sh ---\n{Errors}";
}
