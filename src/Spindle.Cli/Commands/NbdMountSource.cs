using Spindle.Cli.Hosting;
using Spindle.Client;
using Spindle.Storage;

namespace Spindle.Cli.Commands;

/// <summary>
/// NBD URIs as <c>spindle mount</c> and <c>spindle attach</c> sources: the client library's
/// <see cref="NbdBlockDevice"/>, over every path given (the source and each <c>--path</c>), reconnecting for
/// <c>--dead-timeout</c>.
/// </summary>
internal static class NbdMountSource
{
    /// <summary>Registers every NBD scheme with <see cref="MountSource"/>.</summary>
    public static void Register()
    {
        foreach (var scheme in MountSource.NbdSchemes)
        {
            MountSource.RegisterUriScheme(scheme, OpenAsync);
        }
    }

    private static async ValueTask<BlockDevice> OpenAsync(Uri uri, MountSourceOptions options, CancellationToken cancellationToken)
    {
        List<NbdUri> paths;
        try
        {
            paths = [NbdUri.Parse(uri.OriginalString), .. options.Paths.Select(NbdUri.Parse)];
        }
        catch (FormatException exception)
        {
            throw new ConfigurationException(exception.Message);
        }

        var clientOptions = new NbdClientOptions
        {
            // Stable names for /run/spindle/by-uuid/... links, and to check that paths serve one export.
            DiscoverIdentity = true,
            Connections = options.Connections,
            LoggerFactory = options.LoggerFactory,
        };
        if (options.DeadTimeout is { } deadTimeout)
        {
            clientOptions.DeadConnectionTimeout = deadTimeout;
        }

        try
        {
            return await NbdBlockDevice.ConnectAsync(paths, clientOptions, options.ReadOnly, cancellationToken).ConfigureAwait(false);
        }
        catch (NbdException exception)
        {
            throw new ConfigurationException(exception.Message);
        }
    }
}
