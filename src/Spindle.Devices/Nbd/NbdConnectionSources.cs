using System.Net.Sockets;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Spindle.Client;
using Spindle.Devices.Native;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Wire;

namespace Spindle.Devices.Nbd;

/// <summary>
/// Where the sockets handed to the kernel come from: each call opens one connection, negotiated and in
/// transmission. The attachment calls it at connect time and again for every connection the kernel lost.
/// </summary>
public interface INbdConnectionSource : IAsyncDisposable
{
    /// <summary>Names the data path in logs: the server (direct) or the relay.</summary>
    string Description { get; }

    /// <summary>True when the kernel talks to Spindle's own relay rather than to the server.</summary>
    bool IsRelay { get; }

    Task<NbdHandoffSocket> OpenAsync(CancellationToken cancellationToken);
}

/// <summary>
/// Direct: the kernel holds TCP (or Unix) connections to the server itself; no byte passes through this process.
/// Reconnection is this process's job: each lost connection is replaced by a new one negotiated here.
/// </summary>
public sealed class DirectConnectionSource : INbdConnectionSource
{
    private readonly NbdUri _uri;
    private readonly NbdClientOptions _options;
    private readonly ILogger _logger;

    public DirectConnectionSource(NbdUri uri, NbdClientOptions options, ILogger logger)
    {
        _uri = uri;
        _options = options;
        _logger = logger;
    }

    public string Description => _uri.Target;

    public bool IsRelay => false;

    public Task<NbdHandoffSocket> OpenAsync(CancellationToken cancellationToken) => NbdHandoff.ConnectAsync(_uri, _options, _logger, cancellationToken);

    public ValueTask DisposeAsync() => ValueTask.CompletedTask;
}

/// <summary>
/// Relay: the kernel talks NBD over a local socket pair to Spindle's own server, running in this process on one
/// export whose device is <see cref="NbdBlockDevice"/> (or any <see cref="BlockDevice"/>). The client library then
/// carries every request: TLS, several paths, reconnection with replay and the dead timeout all apply to the kernel
/// device, at the cost of a copy through this process.
/// </summary>
public sealed class RelayConnectionSource : INbdConnectionSource
{
    private const string ExportName = "relay";

    private readonly NbdServer _server;
    private readonly ILogger _logger;

    public RelayConnectionSource(BlockDevice device, ILoggerFactory loggerFactory, string description)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(loggerFactory);
        Description = description;
        _logger = loggerFactory.CreateLogger("Spindle.Relay");
        var catalog = new ExportCatalog();
        // One connection at a time from the kernel (the device has a single relay socket), and the client below
        // already keeps FLUSH ordered over all its connections, so multi-conn is safe to advertise.
        catalog.Add(new Export(new ExportOptions { Name = ExportName, ReadOnly = (device.Features & BlockDeviceFeatures.Write) == 0, MultiConn = true }, device));
        _server = new NbdServer(new ServerOptions { AllowList = false }, catalog, loggerFactory);
    }

    public string Description { get; }

    public bool IsRelay => true;

    public async Task<NbdHandoffSocket> OpenAsync(CancellationToken cancellationToken)
    {
        var (kernelEnd, serverEnd) = CreatePair();
        _ = _server.ServeAsync(new SocketTransport(serverEnd, blocking: true, description: "kernel"));
        try
        {
            return await NbdHandoff.NegotiateAsync(kernelEnd, ExportName, "relay", new NbdClientOptions(), _logger, cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            kernelEnd.Dispose();
            throw;
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _server.DisposeAsync().ConfigureAwait(false);
        await _server.Catalog.DisposeAsync().ConfigureAwait(false);
    }

    /// <summary>socketpair(AF_UNIX, SOCK_STREAM): .NET has no call for it.</summary>
    private static unsafe (Socket Kernel, Socket Server) CreatePair()
    {
        var descriptors = stackalloc int[2];
        if (LibC.SocketPair(LibC.AfUnix, LibC.SockStream | LibC.SockCloExec, 0, descriptors) != 0)
        {
            throw new IOException($"socketpair: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
        }

        return (new Socket(new SafeSocketHandle(descriptors[0], ownsHandle: true)), new Socket(new SafeSocketHandle(descriptors[1], ownsHandle: true)));
    }
}
