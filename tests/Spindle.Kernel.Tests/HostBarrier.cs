using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.RegularExpressions;
using Spindle.Testing;
using Xunit;

namespace Spindle.Kernel.Tests;

/// <summary>
/// A rendezvous with the guest's <c>host_barrier PORT</c>: the guest connects to this listener and waits; the test
/// looks at the server while the guest's NBD connections are still open, then releases the guest.
/// </summary>
internal sealed partial class HostBarrier : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);

    public HostBarrier() => _listener.Start();

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    /// <summary>
    /// Runs <paramref name="inspect"/> once the guest reaches the barrier, then lets it go on. Returns false, without
    /// inspecting, if the VM finished first (its report then says why).
    /// </summary>
    public async Task<bool> InspectAsync(Task vm, Func<Task> inspect)
    {
        using var stop = new CancellationTokenSource(KernelVm.BootLimit);
        var accept = _listener.AcceptSocketAsync(stop.Token).AsTask();
        if (await Task.WhenAny(accept, vm) != accept)
        {
            await stop.CancelAsync();
            return false;
        }

        using var guest = await accept;
        try
        {
            await inspect();
        }
        finally
        {
            await guest.SendAsync(new byte[] { 1 });
            guest.Shutdown(SocketShutdown.Both);
        }

        return true;
    }

    /// <summary>
    /// The bytes each established TCP connection to <paramref name="port"/> on 127.0.0.1 has received so far, as the
    /// host kernel counts them (ss -ti): the server's view of every connection, independent of Spindle.
    /// </summary>
    public static async Task<IReadOnlyList<long>> BytesReceivedByServerAsync(int port)
    {
        var ss = await PeerTool.RunCheckedAsync("ss", ["-tinH", "state", "established", "(", "sport", "=", $":{port}", ")"]);
        return [.. BytesReceived().Matches(ss.StandardOutput).Select(m => long.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture))];
    }

    public void Dispose() => _listener.Dispose();

    [GeneratedRegex(@"bytes_received:(\d+)")]
    private static partial Regex BytesReceived();
}
