using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Spindle.Protocol;

namespace Spindle.Wire;

/// <summary>
/// sendmsg(2) on a socket's descriptor with an iovec per segment: one system call for a whole batch of replies,
/// optionally non-blocking (MSG_DONTWAIT). Every segment must be a pinned array (the pinned object heap), which
/// the server's buffers are, so nothing is pinned per call.
/// </summary>
internal static unsafe partial class NativeSocket
{
    public const int MaxSegments = 1024; // IOV_MAX on Linux

    private const int MsgDontWait = 0x40;
    private const int MsgNoSignal = 0x4000;

    [LibraryImport("libc", EntryPoint = "sendmsg", SetLastError = true)]
    private static partial nint SendMsg(int fd, MessageHeader* message, int flags);

    /// <summary>
    /// Sends the segments after the first <paramref name="skip"/> bytes. Returns the bytes sent by this call (0 when
    /// a non-blocking send would block); throws a <see cref="SocketException"/> on any other error.
    /// </summary>
    public static long Send(Socket socket, IList<ArraySegment<byte>> segments, long skip, bool dontWait)
    {
        var count = Math.Min(segments.Count, MaxSegments);
        var vectors = stackalloc IoVector[count];
        var used = 0;
        for (var i = 0; i < count; i++)
        {
            var segment = segments[i];
            if (skip >= segment.Count)
            {
                skip -= segment.Count;
                continue;
            }

            ref var first = ref MemoryMarshal.GetArrayDataReference(segment.Array!);
            vectors[used].Base = (byte*)Unsafe.AsPointer(ref Unsafe.Add(ref first, segment.Offset + (int)skip));
            vectors[used].Length = (nuint)(segment.Count - skip);
            skip = 0;
            used++;
        }

        if (used == 0)
        {
            return 0;
        }

        var header = new MessageHeader { Vectors = vectors, VectorCount = (nuint)used };
        var added = false;
        var handle = socket.SafeHandle;
        try
        {
            handle.DangerousAddRef(ref added);
            var fd = (int)handle.DangerousGetHandle();
            while (true)
            {
                var sent = SendMsg(fd, &header, MsgNoSignal | (dontWait ? MsgDontWait : 0));
                if (sent >= 0)
                {
                    return sent;
                }

                var errno = Marshal.GetLastPInvokeError();
                if (errno == Errno.EINTR)
                {
                    continue;
                }

                if (errno == Errno.EAGAIN && dontWait)
                {
                    return 0;
                }

                throw new SocketException(ToSocketError(errno));
            }
        }
        finally
        {
            if (added)
            {
                handle.DangerousRelease();
            }
        }
    }

    private static int ToSocketError(int errno) => errno switch
    {
        Errno.EPIPE => (int)SocketError.Shutdown,
        Errno.ECONNRESET => (int)SocketError.ConnectionReset,
        Errno.ETIMEDOUT => (int)SocketError.TimedOut,
        Errno.EBADF => (int)SocketError.OperationAborted, // closed under us
        _ => (int)SocketError.SocketError,
    };

    [StructLayout(LayoutKind.Sequential)]
    private struct IoVector
    {
        public byte* Base;
        public nuint Length;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct MessageHeader
    {
        public void* Name;
        public uint NameLength;
        public IoVector* Vectors;
        public nuint VectorCount;
        public void* Control;
        public nuint ControlLength;
        public int Flags;
    }
}
