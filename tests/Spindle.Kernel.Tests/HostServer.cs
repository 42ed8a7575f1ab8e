using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Spindle.Testing;
using Xunit;

namespace Spindle.Kernel.Tests;

/// <summary>
/// <c>spindle serve</c> as its own process on 127.0.0.1, so a test can kill it with SIGKILL and start it again on
/// the same port while the guest's device is in use: what a server crash and restart look like to the kernel.
/// </summary>
internal sealed class HostServer : IAsyncDisposable
{
    private readonly IReadOnlyList<string> _arguments;
    private readonly StringBuilder _log = new();
    private Process? _process;

    public HostServer(int port, IReadOnlyList<string> arguments)
    {
        Port = port;
        _arguments = ["serve", "--bind", "127.0.0.1", "--port", port.ToString(System.Globalization.CultureInfo.InvariantCulture), .. arguments];
    }

    public int Port { get; }

    public int Starts { get; private set; }

    public string Log
    {
        get
        {
            lock (_log)
            {
                return _log.ToString();
            }
        }
    }

    public bool IsRunning => _process is { HasExited: false };

    public async Task StartAsync()
    {
        Starts++;
        _process = PeerTool.Start(SpindleExecutable.Path, _arguments, onOutput: line =>
        {
            lock (_log)
            {
                _log.AppendLine(line);
            }
        });
        var watch = Stopwatch.StartNew();
        while (watch.Elapsed < TimeSpan.FromSeconds(30))
        {
            if (_process.HasExited)
            {
                Assert.Fail($"spindle serve exited ({_process.ExitCode}):\n{Log}");
            }

            try
            {
                using var probe = new TcpClient();
                await probe.ConnectAsync(IPAddress.Loopback, Port);
                return;
            }
            catch (SocketException)
            {
                await Task.Delay(50);
            }
        }

        Assert.Fail($"spindle serve is not listening on {Port} after 30 s:\n{Log}");
    }

    /// <summary>SIGKILL: no flush, no goodbye; the kernel sees its connections reset or closed.</summary>
    public async Task KillAsync()
    {
        if (_process is { HasExited: false } process)
        {
            PeerTool.Signal(process, 9);
            await process.WaitForExitAsync();
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _process, null) is { } process)
        {
            await PeerTool.StopAsync(process);
            process.Dispose();
        }
    }
}

/// <summary>
/// Lets the guest ask the test for things while it runs: the guest sends one line (<c>echo NAME | nc 10.0.2.2
/// PORT</c>), the test does it (kill the server, restart it) and answers one line, which the guest prints.
/// </summary>
internal sealed class ControlChannel : IAsyncDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly Func<string, Task<string>> _handler;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;

    public ControlChannel(Func<string, Task<string>> handler)
    {
        _handler = handler;
        _listener.Start();
        _loop = Task.Run(AcceptAsync);
    }

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    /// <summary>Exceptions the handler threw (a failed assertion), rethrown by the test after the VM ends.</summary>
    public List<Exception> Failures { get; } = [];

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        _listener.Stop();
        await _loop.ConfigureAwait(false);
        _stop.Dispose();
    }

    private async Task AcceptAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            TcpClient client;
            try
            {
                client = await _listener.AcceptTcpClientAsync(_stop.Token);
            }
            catch (Exception exception) when (exception is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }

            using (client)
            {
                string answer;
                try
                {
                    using var reader = new StreamReader(client.GetStream(), leaveOpen: true);
                    var command = (await reader.ReadLineAsync(_stop.Token))?.Trim() ?? string.Empty;
                    answer = await _handler(command);
                }
                catch (Exception exception) when (exception is not OperationCanceledException)
                {
                    lock (Failures)
                    {
                        Failures.Add(exception);
                    }

                    answer = "error " + exception.Message.ReplaceLineEndings(" ");
                }

                try
                {
                    await client.GetStream().WriteAsync(Encoding.ASCII.GetBytes(answer + "\n"), _stop.Token);
                }
                catch (Exception exception) when (exception is IOException or SocketException or OperationCanceledException)
                {
                }
            }
        }
    }
}
