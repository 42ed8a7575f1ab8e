using System.Globalization;
using System.Net.Sockets;
using Spindle.Server;

namespace Spindle.Cli.Hosting.Systemd;

/// <summary>
/// sd_listen_fds(3) without libsystemd: when <c>LISTEN_PID</c> is this process, descriptors 3 to
/// 3 + <c>LISTEN_FDS</c> - 1 are sockets a .socket unit bound and listens on, named by <c>LISTEN_FDNAMES</c>
/// (colon-separated; FileDescriptorName= in the unit, default the socket unit's name). Each stream socket becomes a
/// listener served as if Spindle had bound it; the variables are removed so a child never takes them for its own.
/// </summary>
internal static class SocketActivation
{
    /// <summary>SD_LISTEN_FDS_START: the first passed descriptor.</summary>
    private const int FirstDescriptor = 3;

    /// <summary>The sockets passed to this process, or an empty list when it was not socket-activated.</summary>
    public static IReadOnlyList<ListenEndpoint.Inherited> TakeFromEnvironment()
    {
        var pidText = Environment.GetEnvironmentVariable("LISTEN_PID");
        var countText = Environment.GetEnvironmentVariable("LISTEN_FDS");
        var namesText = Environment.GetEnvironmentVariable("LISTEN_FDNAMES");
        foreach (var name in new[] { "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES" })
        {
            Environment.SetEnvironmentVariable(name, null);
        }

        if (!int.TryParse(pidText, NumberStyles.None, CultureInfo.InvariantCulture, out var pid) || pid != Environment.ProcessId ||
            !int.TryParse(countText, NumberStyles.None, CultureInfo.InvariantCulture, out var count) || count <= 0)
        {
            return [];
        }

        var names = namesText?.Split(':') ?? [];
        var sockets = new List<ListenEndpoint.Inherited>(count);
        for (var i = 0; i < count; i++)
        {
            var descriptor = FirstDescriptor + i;
            var name = i < names.Length && names[i].Length > 0 ? names[i] : "fd" + descriptor.ToString(CultureInfo.InvariantCulture);
            Socket socket;
            try
            {
                // The Socket takes the descriptor over and reads its family, type and protocol from the kernel.
                socket = new Socket(new SafeSocketHandle(descriptor, ownsHandle: true));
            }
            catch (SocketException exception)
            {
                throw new ConfigurationException($"socket activation: descriptor {descriptor} ('{name}') is not a socket: {exception.Message}");
            }

            sockets.Add(new ListenEndpoint.Inherited(socket, name));
        }

        return sockets;
    }
}
