using System.Diagnostics;
using System.Globalization;
using Spindle.Client;

namespace Spindle.Cli.Commands;

/// <summary>
/// The parts of <c>spindle info</c> that follow nbdinfo to the letter: <c>--can</c>/<c>--is</c> with nbdinfo's feature
/// names and exit codes (0 true, 2 false, 1 error), libnbd's human-readable size, and the "content" line (file(1) on
/// the export's first 8 KiB).
/// </summary>
internal static class InfoFeatures
{
    /// <summary>The exit code nbdinfo gives a feature the export lacks.</summary>
    public const int False = 2;

    public static async Task<int> CanAsync(NbdUri target, string feature, TimeSpan? deadTimeout, CancellationToken cancellationToken)
    {
        var normalized = feature.ToLowerInvariant().Replace('_', '-').Replace(' ', '-');
        var test = Test(normalized);
        if (test is null)
        {
            Console.Error.WriteLine($"spindle: unknown --can or --is option: {feature}");
            return 1;
        }

        NbdClient client;
        try
        {
            client = await NbdClient.ConnectAsync(target, ClientCommandSupport.Options(deadTimeout: deadTimeout), cancellationToken).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is IOException or System.Net.Sockets.SocketException or TimeoutException)
        {
            // As nbdinfo: "--can connect" fails quietly; anything else says why.
            if (normalized != "connect")
            {
                Console.Error.WriteLine($"spindle: error: {exception.Message}");
            }

            return 1;
        }

        await using (client.ConfigureAwait(false))
        {
            return test(client.Export) ? 0 : False;
        }
    }

    /// <summary>nbdinfo's names (info/can.c), with the spellings it accepts.</summary>
    private static Func<ExportInfo, bool>? Test(string feature) => feature switch
    {
        "connect" or "read" => _ => true,
        "tls" => e => e.Tls,
        "sr" or "structured" or "structured-reply" or "structured-replies" => e => e.StructuredReplies,
        "extended" or "extended-headers" => e => e.ExtendedHeaders,
        "readonly" or "read-only" => e => e.IsReadOnly,
        "write" => e => !e.IsReadOnly,
        "rotational" => e => e.IsRotational,
        "cache" => e => e.CanCache,
        "df" => e => e.CanDontFragment,
        "fastzero" or "fast-zero" => e => e.CanFastZero,
        "flush" => e => e.CanFlush,
        "fua" => e => e.CanFua,
        "multiconn" or "multi-conn" => e => e.CanMultiConn,
        "trim" => e => e.CanTrim,
        "zero" => e => e.CanWriteZeroes,
        "block-status" => e => e.CanBlockStatus,
        _ => null,
    };

    /// <summary>libnbd's human_size: the largest unit the size is an exact multiple of (64M, 1536M, 4097).</summary>
    public static string HumanSize(long size)
    {
        string[] units = ["", "K", "M", "G", "T", "P", "E"];
        var unit = 0;
        var value = (ulong)size;
        while (value != 0 && (value & 1023) == 0 && unit < units.Length - 1)
        {
            value >>= 10;
            unit++;
        }

        return value.ToString(CultureInfo.InvariantCulture) + units[unit];
    }

    /// <summary>What file(1) says of the first 8 KiB, as nbdinfo shows it; null when file(1) is missing or fails.</summary>
    public static async Task<string?> ContentAsync(NbdClient client, CancellationToken cancellationToken)
    {
        var length = (int)Math.Min(8192, client.Size);
        var buffer = new byte[length];
        try
        {
            if (length > 0)
            {
                await client.ReadAsync(0, buffer, cancellationToken).ConfigureAwait(false);
            }

            using var process = Process.Start(new ProcessStartInfo("file", ["-b", "-"])
            {
                RedirectStandardInput = true,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            });
            if (process is null)
            {
                return null;
            }

            await process.StandardInput.BaseStream.WriteAsync(buffer, cancellationToken).ConfigureAwait(false);
            process.StandardInput.Close();
            var line = await process.StandardOutput.ReadLineAsync(cancellationToken).ConfigureAwait(false);
            await process.WaitForExitAsync(cancellationToken).ConfigureAwait(false);
            return process.ExitCode == 0 && !string.IsNullOrWhiteSpace(line) ? line.Trim() : null;
        }
        catch (Exception exception) when (exception is System.ComponentModel.Win32Exception or IOException or NbdException)
        {
            // Best effort, as in nbdinfo: no content line.
            return null;
        }
    }
}
