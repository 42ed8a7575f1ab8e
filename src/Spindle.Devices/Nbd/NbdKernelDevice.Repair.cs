using Microsoft.Extensions.Logging;
using Spindle.Client;
using Spindle.Devices.Logging;
using Spindle.Devices.Native;

namespace Spindle.Devices.Nbd;

/// <summary>Replacing the connections the driver lost: reconnect with backoff, renegotiate, RECONFIGURE.</summary>
public sealed partial class NbdKernelDevice
{
    /// <summary>
    /// Hands the driver a new connection for each one it lost. <paramref name="first"/> is a connection already
    /// opened (an adoption's probe) to use first. Known sockets tell how many died; with sockets of an earlier
    /// process unknown, connections are handed until the driver leaves one unused.
    /// </summary>
    private async Task RepairAsync(NbdHandoffSocket? first, CancellationToken cancellationToken)
    {
        if (first is null)
        {
            // The notification can overtake the shutdown of the socket it is about: give the poll a moment to see it.
            var missing = 0;
            for (var attempt = 0; attempt < 10; attempt++)
            {
                missing = PruneDead();
                if (missing > 0)
                {
                    break;
                }

                await Task.Delay(100, cancellationToken).ConfigureAwait(false);
            }

            if (missing == 0)
            {
                // None of the known sockets died: the dead one is a socket of an earlier process, if any.
                lock (_sockets)
                {
                    _assumedAlive = 0;
                }

                if (PruneDead() == 0)
                {
                    return;
                }
            }
        }

        var next = first;
        while (PruneDead() > 0)
        {
            next ??= await OpenWithBackoffAsync(_source, _options, _logger, Export, cancellationToken).ConfigureAwait(false);
            var socket = next;
            next = null;
            _driver.Reconfigure(Index, [socket.Descriptor], _options.BackendIdentifier);
            if (!TakenByDriver(socket))
            {
                // No dead slot was left: every connection the driver has is alive.
                socket.Disconnect();
                lock (_sockets)
                {
                    // The unknown sockets of an earlier process are alive: count them as such from now on.
                    _assumedAlive = Connections - _sockets.Count;
                }

                return;
            }

            lock (_sockets)
            {
                _sockets.Add(socket);
            }

            Interlocked.Increment(ref _reconnections);
            DevicesLog.Reconnected(_logger, DevicePath, _source.Description, Reconnections);
        }

        next?.Disconnect();
    }

    /// <summary>Forgets the sockets the driver gave up on; returns how many connections the device lacks.</summary>
    private int PruneDead()
    {
        lock (_sockets)
        {
            foreach (var dead in _sockets.Where(IsDead).ToList())
            {
                _sockets.Remove(dead);
                // The driver shut it down and is done with it (or will be at RECONFIGURE): closing it loses nothing.
                dead.Dispose();
                _assumedAlive = Math.Min(_assumedAlive, Connections - _sockets.Count);
            }

            return Math.Max(0, Connections - _sockets.Count - _assumedAlive);
        }
    }

    /// <summary>The driver sets its request timeout as the send timeout of every socket it takes.</summary>
    private static bool TakenByDriver(NbdHandoffSocket socket) => LibC.SendTimeoutMilliseconds(socket.Descriptor) > 0;

    /// <summary>
    /// Opens a connection, trying again at once, then after <see cref="NbdKernelOptions.ReconnectDelay"/> doubling
    /// up to <see cref="NbdKernelOptions.MaxReconnectDelay"/>, until one works with the same export or the caller stops.
    /// </summary>
    private static async Task<NbdHandoffSocket> OpenWithBackoffAsync(INbdConnectionSource source, NbdKernelOptions options, ILogger logger, ExportInfo? expected,
        CancellationToken cancellationToken)
    {
        var delay = TimeSpan.Zero;
        for (var attempt = 1; ; attempt++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            NbdHandoffSocket? socket = null;
            try
            {
                socket = await source.OpenAsync(cancellationToken).ConfigureAwait(false);
                if (expected is not null)
                {
                    CheckSameExport(expected, socket.Export, source.Description);
                }

                return socket;
            }
            catch (Exception exception) when (exception is NbdException or IOException or System.Net.Sockets.SocketException && !cancellationToken.IsCancellationRequested)
            {
                socket?.Disconnect();
                if (attempt == 1 || attempt % 10 == 0)
                {
                    DevicesLog.ReconnectFailed(logger, source.Description, attempt, exception.Message);
                }
            }

            await Task.Delay(delay, cancellationToken).ConfigureAwait(false);
            delay = delay == TimeSpan.Zero ? options.ReconnectDelay : TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, options.MaxReconnectDelay.Ticks));
        }
    }
}
