using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace Spindle.Bench;

/// <summary>
/// What the hardware and kernel allow, measured in the same run as the servers: loopback TCP throughput (the
/// ceiling for sequential I/O over NBD) and the 28-byte request / 4 KiB reply round trip (the floor for QD1 latency).
/// </summary>
internal static class Limits
{
    /// <summary>One TCP stream over loopback, 1 MiB writes, for <paramref name="duration"/>: bytes per second.</summary>
    public static double TcpStreamBytesPerSecond(TimeSpan duration)
    {
        using var listener = new Socket(SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        using var sender = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        sender.Connect(listener.LocalEndPoint!);
        using var receiver = listener.Accept();
        var received = 0L;
        var stop = false;
        var reader = new Thread(() =>
        {
            var buffer = new byte[1 << 20];
            while (true)
            {
                var read = receiver.Receive(buffer);
                if (read <= 0)
                {
                    return;
                }

                Interlocked.Add(ref received, read);
            }
        });
        reader.Start();
        var chunk = new byte[1 << 20];
        Random.Shared.NextBytes(chunk);
        var watch = Stopwatch.StartNew();
        var startBytes = 0L;
        var warmedUp = false;
        while (!stop)
        {
            sender.Send(chunk);
            if (!warmedUp && watch.Elapsed > TimeSpan.FromMilliseconds(500))
            {
                warmedUp = true;
                startBytes = Interlocked.Read(ref received);
                watch.Restart();
            }

            stop = warmedUp && watch.Elapsed >= duration;
        }

        var bytes = Interlocked.Read(ref received) - startBytes;
        var seconds = watch.Elapsed.TotalSeconds;
        sender.Shutdown(SocketShutdown.Send);
        reader.Join();
        return bytes / seconds;
    }

    /// <summary>
    /// Ping-pong over loopback: 28 bytes one way (a request header), 16 + 4096 back (a reply and its data), blocking
    /// sockets on two threads. Returns the mean and 99th percentile in microseconds.
    /// </summary>
    public static (double Mean, double P99) RoundTripMicroseconds(int iterations)
    {
        using var listener = new Socket(SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        using var client = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        client.Connect(listener.LocalEndPoint!);
        using var server = listener.Accept();
        server.NoDelay = true;
        var echo = new Thread(() =>
        {
            var request = new byte[28];
            var reply = new byte[16 + 4096];
            while (true)
            {
                if (!ReceiveExactly(server, request))
                {
                    return;
                }

                server.Send(reply);
            }
        });
        echo.Start();
        var requestBytes = new byte[28];
        var replyBytes = new byte[16 + 4096];
        var samples = new double[iterations];
        for (var i = -1000; i < iterations; i++)
        {
            var start = Stopwatch.GetTimestamp();
            client.Send(requestBytes);
            ReceiveExactly(client, replyBytes);
            if (i >= 0)
            {
                samples[i] = Stopwatch.GetElapsedTime(start).TotalMicroseconds;
            }
        }

        client.Shutdown(SocketShutdown.Send);
        echo.Join();
        Array.Sort(samples);
        return (samples.Average(), samples[(int)(iterations * 0.99)]);
    }

    private static bool ReceiveExactly(Socket socket, byte[] buffer)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var read = socket.Receive(buffer, done, buffer.Length - done, SocketFlags.None);
            if (read <= 0)
            {
                return false;
            }

            done += read;
        }

        return true;
    }
}
