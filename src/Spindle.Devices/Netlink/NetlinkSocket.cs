using System.Runtime.InteropServices;
using Spindle.Devices.Native;

namespace Spindle.Devices.Netlink;

/// <summary>
/// A NETLINK_GENERIC socket: requests with their answers (matched by sequence number, ended by the acknowledgement
/// or error NLM_F_ACK asks for), or, subscribed to a multicast group, a stream of notifications. Blocking calls on
/// the caller's thread: the driver answers within its own system call, and notifications are waited for on a
/// thread of their own.
/// </summary>
internal sealed unsafe class NetlinkSocket : IDisposable
{
    /// <summary>Large enough for any answer of the families used here (the controller's is the longest, ~1 KiB).</summary>
    private const int ReceiveSize = 32 * 1024;

    private readonly byte[] _receive = new byte[ReceiveSize];
    private int _fd;
    private uint _sequence = (uint)Environment.TickCount;

    private NetlinkSocket(int fd)
    {
        _fd = fd;
    }

    public static NetlinkSocket Open()
    {
        var fd = LibC.Socket(LibC.AfNetlink, LibC.SockRaw | LibC.SockCloExec, LibC.NetlinkGeneric);
        if (fd < 0)
        {
            throw new NetlinkException("socket(AF_NETLINK, NETLINK_GENERIC)", Marshal.GetLastPInvokeError());
        }

        var address = new LibC.SockAddrNetlink { Family = LibC.AfNetlink };
        if (LibC.Bind(fd, &address, sizeof(LibC.SockAddrNetlink)) != 0)
        {
            var error = Marshal.GetLastPInvokeError();
            LibC.Close(fd);
            throw new NetlinkException("bind(AF_NETLINK)", error);
        }

        return new NetlinkSocket(fd);
    }

    public uint NextSequence() => unchecked(++_sequence);

    /// <summary>Joins a multicast group (its id from the controller): its notifications then arrive on this socket.</summary>
    public void Subscribe(uint group)
    {
        if (LibC.SetSockOpt(_fd, LibC.SolNetlink, LibC.NetlinkAddMembership, &group, sizeof(uint)) != 0)
        {
            throw new NetlinkException("NETLINK_ADD_MEMBERSHIP", Marshal.GetLastPInvokeError());
        }
    }

    /// <summary>
    /// Sends <paramref name="request"/> and collects the generic payloads of the answers carrying its sequence
    /// number until the acknowledgement. An error answer throws <see cref="NetlinkException"/> with its errno.
    /// </summary>
    public List<byte[]> Request(byte[] request, string what)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (!NetlinkHeader.TryRead(request, out var sent))
        {
            throw new ArgumentException("not a netlink message", nameof(request));
        }

        fixed (byte* bytes = request)
        {
            if (LibC.Send(_fd, bytes, request.Length, 0) != request.Length)
            {
                throw new NetlinkException(what, Marshal.GetLastPInvokeError());
            }
        }

        var answers = new List<byte[]>();
        // Bounded: the kernel answers a request with a handful of messages; a thousand datagrams without the
        // acknowledgement means something else is talking on this socket.
        for (var datagrams = 0; datagrams < 1000; datagrams++)
        {
            var length = ReceiveBlocking(-1);
            var reader = new NetlinkDatagramReader(_receive.AsSpan(0, length));
            while (reader.TryNext(out var message))
            {
                if (message.Header.Sequence != sent.Sequence)
                {
                    continue;
                }

                if (message.TryReadError(out var error, out _))
                {
                    if (error != 0)
                    {
                        throw new NetlinkException(what, -error);
                    }

                    return answers;
                }

                if (message.Header.Type == NetlinkHeader.TypeDone)
                {
                    return answers;
                }

                answers.Add(message.Payload.ToArray());
            }

            if (reader.IsMalformed)
            {
                throw new NetlinkException($"{what}: a malformed answer from the kernel", 0);
            }
        }

        throw new NetlinkException($"{what}: no acknowledgement from the kernel", 0);
    }

    /// <summary>
    /// Waits up to <paramref name="timeoutMilliseconds"/> (-1: forever) for a datagram and returns the messages in it
    /// (their generic payloads and types); an empty list when the time passed. Used for multicast notifications.
    /// </summary>
    public List<(ushort Type, byte[] Payload)> ReceiveNotifications(int timeoutMilliseconds)
    {
        var messages = new List<(ushort, byte[])>();
        var length = ReceiveBlocking(timeoutMilliseconds);
        if (length <= 0)
        {
            return messages;
        }

        var reader = new NetlinkDatagramReader(_receive.AsSpan(0, length));
        while (reader.TryNext(out var message))
        {
            messages.Add((message.Header.Type, message.Payload.ToArray()));
        }

        return messages;
    }

    public void Dispose()
    {
        var fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            LibC.Close(fd);
        }
    }

    /// <summary>The length of the datagram received, 0 when the wait timed out.</summary>
    private int ReceiveBlocking(int timeoutMilliseconds)
    {
        while (true)
        {
            ObjectDisposedException.ThrowIf(_fd < 0, this);
            var entry = new LibC.PollFd { Fd = _fd, Events = LibC.PollIn };
            var ready = LibC.Poll(&entry, 1, timeoutMilliseconds);
            if (ready == 0)
            {
                return 0;
            }

            if (ready < 0)
            {
                var error = Marshal.GetLastPInvokeError();
                if (error == LibC.EIntr)
                {
                    continue;
                }

                throw new NetlinkException("poll(netlink)", error);
            }

            fixed (byte* buffer = _receive)
            {
                var received = LibC.Receive(_fd, buffer, _receive.Length, 0);
                if (received >= 0)
                {
                    return (int)received;
                }

                var error = Marshal.GetLastPInvokeError();
                // ENOBUFS: notifications were dropped because this socket's buffer was full. The caller's periodic
                // check covers what was missed; EINTR/EAGAIN: try again.
                if (error is LibC.EIntr or LibC.EAgain or LibC.ENoBufs)
                {
                    if (error == LibC.ENoBufs)
                    {
                        return 0;
                    }

                    continue;
                }

                throw new NetlinkException("recv(netlink)", error);
            }
        }
    }
}

/// <summary>A netlink request the kernel refused (its errno), or a socket call that failed.</summary>
public sealed class NetlinkException : IOException
{
    public NetlinkException(string operation, int errno)
        : base(errno == 0 ? operation : $"{operation}: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})")
    {
        Errno = errno;
    }

    public NetlinkException()
    {
    }

    public NetlinkException(string message)
        : base(message)
    {
    }

    public NetlinkException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    /// <summary>The errno (positive), 0 when the failure was not a system error.</summary>
    public int Errno { get; }
}
