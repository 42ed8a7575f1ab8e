using System.Diagnostics;
using System.Globalization;
using System.Text;

namespace Spindle.Bench;

/// <summary>Running programs and reading what /proc says about them.</summary>
internal static class Processes
{
    public sealed record Result(int ExitCode, string Output, string Error, TimeSpan Elapsed);

    public static async Task<Result> RunAsync(string program, IEnumerable<string> arguments, TimeSpan timeout)
    {
        var start = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var argument in arguments)
        {
            start.ArgumentList.Add(argument);
        }

        start.Environment["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        using var process = Process.Start(start)!;
        var output = process.StandardOutput.ReadToEndAsync();
        var error = process.StandardError.ReadToEndAsync();
        var watch = Stopwatch.StartNew();
        using var cancel = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(cancel.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync(CancellationToken.None);
            throw new TimeoutException($"{program} {string.Join(' ', start.ArgumentList)} did not finish within {timeout.TotalSeconds} s");
        }

        return new Result(process.ExitCode, await output, await error, watch.Elapsed);
    }

    public static Process Start(string program, IEnumerable<string> arguments, string? logFile = null)
    {
        var start = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var argument in arguments)
        {
            start.ArgumentList.Add(argument);
        }

        start.Environment["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        var process = Process.Start(start)!;
        var log = logFile is null ? null : new StreamWriter(logFile, append: true) { AutoFlush = true };
        process.OutputDataReceived += (_, e) => Write(log, e.Data);
        process.ErrorDataReceived += (_, e) => Write(log, e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    private static void Write(StreamWriter? log, string? line)
    {
        if (log is not null && line is not null)
        {
            lock (log)
            {
                log.WriteLine(line);
            }
        }
    }

    /// <summary>The PIDs of a process and all its descendants (nbd-server forks one child per client).</summary>
    public static List<int> Tree(int root)
    {
        var children = new Dictionary<int, List<int>>();
        foreach (var directory in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(directory), out var pid))
            {
                continue;
            }

            var parent = ReadStat(pid) is { } stat ? stat.Parent : -1;
            if (parent > 0)
            {
                (children.TryGetValue(parent, out var list) ? list : children[parent] = []).Add(pid);
            }
        }

        var tree = new List<int> { root };
        for (var i = 0; i < tree.Count && i < 10000; i++)
        {
            if (children.TryGetValue(tree[i], out var list))
            {
                tree.AddRange(list);
            }
        }

        return tree;
    }

    /// <summary>CPU seconds used by a process tree, including reaped children.</summary>
    public static double CpuSeconds(int root)
    {
        var ticks = 0L;
        var first = true;
        foreach (var pid in Tree(root))
        {
            if (ReadStat(pid) is { } stat)
            {
                ticks += stat.UserTicks + stat.SystemTicks + (first ? stat.ChildUserTicks + stat.ChildSystemTicks : 0);
            }

            first = false;
        }

        return ticks / 100.0; // USER_HZ
    }

    /// <summary>Resident memory of a process tree, in bytes.</summary>
    public static long ResidentBytes(int root)
    {
        var total = 0L;
        foreach (var pid in Tree(root))
        {
            total += StatusKilobytes(pid, "VmRSS:") * 1024;
        }

        return total;
    }

    private static long StatusKilobytes(int pid, string field)
    {
        try
        {
            foreach (var line in File.ReadLines($"/proc/{pid}/status"))
            {
                if (line.StartsWith(field, StringComparison.Ordinal))
                {
                    return long.Parse(line[field.Length..].Trim().Split(' ')[0], CultureInfo.InvariantCulture);
                }
            }
        }
        catch (IOException)
        {
        }

        return 0;
    }

    /// <summary>
    /// Proportional set size of a process tree (shared pages split between the processes sharing them), read once:
    /// for a server that forks per client (nbd-server) the RSS sum counts the shared binary and libraries once per
    /// child, the PSS sum does not.
    /// </summary>
    public static long ProportionalBytes(int root)
    {
        var total = 0L;
        foreach (var pid in Tree(root))
        {
            try
            {
                foreach (var line in File.ReadLines($"/proc/{pid}/smaps_rollup"))
                {
                    if (line.StartsWith("Pss:", StringComparison.Ordinal))
                    {
                        total += long.Parse(line[4..].Trim().Split(' ')[0], CultureInfo.InvariantCulture) * 1024;
                        break;
                    }
                }
            }
            catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
            {
            }
        }

        return total;
    }

    /// <summary>
    /// TCP connections in state ESTABLISHED whose local end is 127.0.0.1:<paramref name="port"/>, from /proc/net/tcp:
    /// the server's side of every client connection, whichever process of the server holds it.
    /// </summary>
    public static int EstablishedConnections(int port)
    {
        // Each line: "sl local_address rem_address st ...", addresses as hex "0100007F:PPPP", state 01 = ESTABLISHED.
        var local = $"0100007F:{port:X4}";
        var count = 0;
        try
        {
            foreach (var line in File.ReadLines("/proc/net/tcp").Skip(1))
            {
                var fields = line.Split(' ', 5, StringSplitOptions.RemoveEmptyEntries);
                if (fields.Length >= 4 && fields[1] == local && fields[3] == "01")
                {
                    count++;
                }
            }
        }
        catch (IOException)
        {
        }

        return count;
    }

    private sealed record Stat(int Parent, long UserTicks, long SystemTicks, long ChildUserTicks, long ChildSystemTicks);

    private static Stat? ReadStat(int pid)
    {
        try
        {
            var text = File.ReadAllText($"/proc/{pid}/stat");
            var close = text.LastIndexOf(')');
            var fields = text[(close + 2)..].Split(' ');

            // After "pid (comm)": state ppid ... utime(14) stime(15) cutime(16) cstime(17), counted from 1 at pid.
            return new Stat(
                int.Parse(fields[1], CultureInfo.InvariantCulture),
                long.Parse(fields[11], CultureInfo.InvariantCulture),
                long.Parse(fields[12], CultureInfo.InvariantCulture),
                long.Parse(fields[13], CultureInfo.InvariantCulture),
                long.Parse(fields[14], CultureInfo.InvariantCulture));
        }
        catch (Exception exception) when (exception is IOException or FormatException or IndexOutOfRangeException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>Samples a process tree's resident memory every 100 ms and keeps the peak.</summary>
    public sealed class PeakSampler : IAsyncDisposable
    {
        private readonly CancellationTokenSource _stop = new();
        private readonly Task _loop;

        public PeakSampler(int root) => _loop = Task.Run(async () =>
        {
            while (!_stop.IsCancellationRequested)
            {
                PeakBytes = Math.Max(PeakBytes, ResidentBytes(root));
                try
                {
                    await Task.Delay(100, _stop.Token);
                }
                catch (OperationCanceledException)
                {
                }
            }
        });

        public long PeakBytes { get; private set; }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            await _loop;
            _stop.Dispose();
        }
    }

    /// <summary>Samples the connections established to a port every 20 ms and keeps the most seen at once.</summary>
    public sealed class ConnectionSampler : IAsyncDisposable
    {
        private readonly CancellationTokenSource _stop = new();
        private readonly Task _loop;

        public ConnectionSampler(int port) => _loop = Task.Run(async () =>
        {
            while (!_stop.IsCancellationRequested)
            {
                Peak = Math.Max(Peak, EstablishedConnections(port));
                try
                {
                    await Task.Delay(20, _stop.Token);
                }
                catch (OperationCanceledException)
                {
                }
            }
        });

        public int Peak { get; private set; }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            await _loop;
            _stop.Dispose();
        }
    }

    public static string Describe(IEnumerable<string> arguments)
    {
        var builder = new StringBuilder();
        foreach (var argument in arguments)
        {
            builder.Append(argument.Contains(' ') ? $"'{argument}'" : argument).Append(' ');
        }

        return builder.ToString().TrimEnd();
    }
}
