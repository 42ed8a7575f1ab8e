using System.Globalization;

namespace Spindle.Cli.Hosting;

/// <summary>
/// <c>--pid-file PATH</c>: the process id, written once the server listens (so whoever waits for the file can
/// connect) and removed when it stops. Written before privileges are dropped; if the user it drops to may not remove
/// it, it stays (stale files are harmless: the next start overwrites it).
/// </summary>
internal sealed class PidFile : IDisposable
{
    private readonly string _path;

    private PidFile(string path)
    {
        _path = path;
    }

    public static PidFile Write(string path)
    {
        var full = Path.GetFullPath(path);
        var temporary = full + ".tmp";
        File.WriteAllText(temporary, Environment.ProcessId.ToString(CultureInfo.InvariantCulture) + "\n");
        File.Move(temporary, full, overwrite: true);
        return new PidFile(full);
    }

    public void Dispose()
    {
        try
        {
            File.Delete(_path);
        }
        catch (Exception exception) when (exception is IOException or UnauthorizedAccessException)
        {
        }
    }
}
