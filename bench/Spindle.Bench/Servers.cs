using System.Diagnostics;
using System.Net.Sockets;

namespace Spindle.Bench;

/// <summary>
/// One NBD server in the comparison, serving its image on 127.0.0.1. <paramref name="name"/> is the row it fills in
/// the report (and what <c>--servers</c> selects): a server variant's name, e.g. "spindle" or "qemu-nbd".
/// </summary>
internal abstract class ServerUnderTest(string name) : IAsyncDisposable
{
    private Process? _process;

    public string Name { get; } = name;

    public int Port { get; private set; }

    /// <summary>The process whose tree is measured.</summary>
    public int Pid { get; protected set; }

    public virtual string ExportName => string.Empty;

    public string Uri => $"nbd://127.0.0.1:{Port}/{ExportName}";

    public string Version { get; protected set; } = "?";

    private string _image = string.Empty;
    private string _work = string.Empty;

    /// <summary>How many times the server had to be started again because it was gone.</summary>
    public int Restarts { get; private set; }

    public async Task StartAsync(string image, int port, string workDirectory)
    {
        Port = port;
        _image = image;
        _work = workDirectory;
        _process = Launch(image, port, workDirectory);
        Pid = _process?.Id ?? Pid;
        await WaitForPortAsync(port);
    }

    /// <summary>
    /// Before each run: if the server died (or something else killed it) start it again on the same port, and count
    /// it, so one lost process does not lose the whole benchmark and the report says it happened.
    /// </summary>
    public async Task EnsureRunningAsync()
    {
        if (IsAlive())
        {
            return;
        }

        Restarts++;
        Console.WriteLine($"bench: {Name} is gone; starting it again ({Restarts})");
        _process?.Dispose();
        _process = Launch(_image, Port, _work);
        Pid = _process?.Id ?? Pid;
        await WaitForPortAsync(Port);
    }

    /// <summary>
    /// Stops the server and starts it again on the same port, so each workload meets a fresh process: its peak memory
    /// is the workload's own, not what an earlier workload left behind (buffers a server keeps, heap it grew).
    /// </summary>
    public async Task RestartAsync()
    {
        await StopProcessAsync();
        _process?.Dispose();
        _process = Launch(_image, Port, _work);
        Pid = _process?.Id ?? Pid;
        await WaitForPortAsync(Port);
    }

    /// <summary>
    /// Stops the server (killed, as before every restart) and waits until it is gone, so the image it served can be
    /// replaced or checked; the next <see cref="RestartAsync"/> starts it again.
    /// </summary>
    public Task StopAsync() => StopProcessAsync();

    private bool IsAlive()
    {
        try
        {
            using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
            socket.Connect("127.0.0.1", Port);
            return File.Exists($"/proc/{Pid}/stat");
        }
        catch (SocketException)
        {
            return false;
        }
    }

    protected abstract Process? Launch(string image, int port, string workDirectory);

    /// <summary>Stops the server's processes and waits until they are gone.</summary>
    protected virtual async Task StopProcessAsync()
    {
        if (_process is { HasExited: false })
        {
            _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync();
        }
    }

    public virtual async ValueTask DisposeAsync()
    {
        if (_process is { HasExited: false })
        {
            _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync();
        }

        _process?.Dispose();
    }

    private static async Task WaitForPortAsync(int port)
    {
        for (var attempt = 0; attempt < 300; attempt++)
        {
            try
            {
                using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
                await socket.ConnectAsync("127.0.0.1", port);
                return;
            }
            catch (SocketException)
            {
                await Task.Delay(50);
            }
        }

        throw new TimeoutException($"nothing listens on 127.0.0.1:{port} after 15 s");
    }
}

/// <summary>
/// <c>spindle serve</c> from the executable ./spindle builds (Native AOT, or ReadyToRun where the toolchain is
/// missing); <paramref name="extraArguments"/> go before the image (a variant's own options).
/// </summary>
internal sealed class SpindleServer(string name, SpindleBinary binary, IReadOnlyList<string>? extraArguments = null) : ServerUnderTest(name)
{
    /// <summary>In an extra argument, stands for the path of the image served (a layer's file named after it).</summary>
    public const string ImagePlaceholder = "{image}";

    protected override Process Launch(string image, int port, string workDirectory)
    {
        Version = $"{binary.Version} ({binary.Kind})";
        var extra = (extraArguments ?? []).Select(a => a.Replace(ImagePlaceholder, image, StringComparison.Ordinal));
        return Processes.Start(binary.Path, ["serve", "--bind", "127.0.0.1", "--port", port.ToString(System.Globalization.CultureInfo.InvariantCulture), "--quiet", .. extra, image], Path.Combine(workDirectory, Name + ".log"));
    }
}

internal sealed class NbdkitServer() : ServerUnderTest("nbdkit")
{
    protected override Process Launch(string image, int port, string workDirectory) =>
        Processes.Start("nbdkit", ["--foreground", "--port", port.ToString(System.Globalization.CultureInfo.InvariantCulture), "--ipaddr", "127.0.0.1", "file", image], Path.Combine(workDirectory, "nbdkit.log"));
}

/// <summary>Debian's nbd-server: a configuration file, flush and FUA enabled, forking a child per client.</summary>
internal sealed class NbdServerServer() : ServerUnderTest("nbd-server")
{
    private string? _pidFile;

    public override string ExportName => "bench";

    protected override Process? Launch(string image, int port, string workDirectory)
    {
        var config = Path.Combine(workDirectory, "nbd-server.conf");
        _pidFile = Path.Combine(workDirectory, "nbd-server.pid");
        File.WriteAllText(config, $"""
            [generic]
                listenaddr = 127.0.0.1
                port = {port}
                allowlist = true
            [bench]
                exportname = {image}
                flush = true
                fua = true
                trim = true
            """);
        File.Delete(_pidFile);
        var result = Processes.RunAsync("nbd-server", ["-C", config, "-p", _pidFile], TimeSpan.FromSeconds(30)).GetAwaiter().GetResult();
        if (result.ExitCode != 0)
        {
            throw new InvalidOperationException("nbd-server did not start: " + result.Error);
        }

        // The daemon creates the pid file and then writes it: wait (at most 10 s) until it holds a number.
        for (var i = 0; i < 200; i++)
        {
            if (File.Exists(_pidFile) && int.TryParse(File.ReadAllText(_pidFile).Trim(), System.Globalization.CultureInfo.InvariantCulture, out var pid))
            {
                Pid = pid;
                return null;
            }

            Thread.Sleep(50);
        }

        throw new InvalidOperationException($"nbd-server did not write its pid to {_pidFile}");
    }

    /// <summary>A daemon, not a child: its tree is found by the pid file and killed, and waited for (at most 10 s).</summary>
    protected override async Task StopProcessAsync()
    {
        if (Pid == 0)
        {
            return;
        }

        var tree = Processes.Tree(Pid);
        foreach (var pid in tree.AsEnumerable().Reverse())
        {
            try
            {
                Process.GetProcessById(pid).Kill();
            }
            catch (ArgumentException)
            {
            }
        }

        for (var i = 0; i < 200 && tree.Any(IsRunning); i++)
        {
            await Task.Delay(50);
        }
    }

    /// <summary>Alive and not a zombie (a killed daemon is reparented to whatever init reaps it, maybe late).</summary>
    private static bool IsRunning(int pid)
    {
        try
        {
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            var state = stat[(stat.LastIndexOf(')') + 2)..].FirstOrDefault();
            return state is not ('Z' or 'X');
        }
        catch (IOException)
        {
            return false;
        }
    }

    public override async ValueTask DisposeAsync()
    {
        await StopProcessAsync();
        await base.DisposeAsync();
    }
}

/// <summary>
/// qemu-nbd: writeback cache, any number of shared connections, persistent; <paramref name="format"/> is the image's
/// format as qemu names it ("raw"; "qcow2" for a qcow2 variant).
/// </summary>
internal sealed class QemuNbdServer(string name, string format = "raw") : ServerUnderTest(name)
{
    protected override Process Launch(string image, int port, string workDirectory) =>
        Processes.Start("qemu-nbd", [$"--format={format}", "--bind=127.0.0.1", $"--port={port}", "--cache=writeback", "--shared=0", "--persistent", image], Path.Combine(workDirectory, Name + ".log"));
}
