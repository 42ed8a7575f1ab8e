using System.Text;
using Spindle.Cli.Hosting;

namespace Spindle.Fuzz.Targets;

/// <summary>
/// The nbd-server style configuration file reader (<see cref="IniConfigurationReader.Parse"/>), the input read as
/// UTF-8. It is parsed as a file in an empty folder, so relative includes find nothing. Invariant: a configuration
/// or a <see cref="ConfigurationException"/>, never another exception type.
/// </summary>
[Covers(typeof(IniConfigurationReader), nameof(IniConfigurationReader.Parse))]
public sealed class IniConfiguration : FuzzTarget
{
    private static readonly string SourceName = Path.Combine(Path.GetTempPath(), "spindle-fuzz-empty", "nbd-server.conf");

    public override void Run(byte[] input)
    {
        try
        {
            _ = IniConfigurationReader.Parse(Encoding.UTF8.GetString(input), SourceName);
        }
        catch (ConfigurationException)
        {
        }
        catch (Exception exception)
        {
            throw new InvariantViolation($"the configuration reader threw {exception.GetType().Name}, not a ConfigurationException: {exception.Message}", exception);
        }
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        yield return ("nbd-server", """
            [generic]
                port = 10809
                allowlist = true
                max_connections = 16
                session_names = alice=10.0.0.5,ops=10.1.0.0/16
                idle_timeout = 60
            [disk]
                exportname = /srv/disk.img
                readonly = false
                trim = true
                flush = true
                authfile = /etc/nbd-server/allow
                uuid = 0f5e1c52-8a4b-4c3e-9d7a-2b6c1e0f9a11
                label = data
            [mem]
                backend = memory
                size = 64M
                tls = require
            """u8.ToArray());
        yield return ("rbd-and-directory", """
            [generic]
            [rbd]
            exportname = rbd:pool/image
            [dir]
            backend = directory
            path = /srv/disks/%SESSNAME%
            """u8.ToArray());
    }
}
