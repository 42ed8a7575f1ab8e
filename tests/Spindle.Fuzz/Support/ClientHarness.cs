using Spindle.Client;
using Spindle.Wire;

namespace Spindle.Fuzz.Support;

/// <summary>
/// A real <see cref="NbdClient"/> whose one connection runs over an in-memory stream the target scripts as the server
/// (through the client's internal <see cref="NbdClientOptions.ConnectTransport"/> hook). No reconnection: a failed
/// connection fails its requests, so every run ends.
/// </summary>
internal static class ClientHarness
{
    public static NbdClientOptions Options(Stream clientEnd, bool listAndIdentify)
    {
        var used = 0;
        return new NbdClientOptions
        {
            DeadConnectionTimeout = TimeSpan.Zero,
            HandshakeTimeout = Bounded.Limit,
            DisconnectTimeout = TimeSpan.FromSeconds(1),
            ListMetaContexts = listAndIdentify,
            DiscoverIdentity = listAndIdentify,
            ConnectTransport = (_, _) => Interlocked.Exchange(ref used, 1) == 0
                ? Task.FromResult<Transport>(new StreamTransport(clientEnd, "fuzz-server"))
                : throw new NbdConnectionException("the fuzz harness has one connection only"),
        };
    }

    public static NbdUri Uri { get; } = NbdUri.ForTcp("fuzz-server", NbdUri.DefaultPort, "disk");
}
