using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Spindle.Fuse.Kernel;
using Spindle.Fuse.Logging;
using Spindle.Fuse.Native;
using Spindle.Protocol;

namespace Spindle.Fuse;

/// <summary>What INIT settled on.</summary>
internal sealed record FuseConnectionInfo(uint KernelMajor, uint KernelMinor, uint Minor, uint MaxWrite, int MaxPages, FuseInitFlags Flags);

/// <summary>
/// One FUSE connection: threads reading requests from /dev/fuse, each request served on the thread that read it
/// as far as the device lets it go synchronously, and replied to from whichever thread completes it.
/// </summary>
/// <remarks>
/// Threading follows libfuse's multi-threaded loop: a thread that picks up a request when no other thread is
/// waiting in read() starts one more (up to <see cref="FuseMountOptions.MaxThreads"/>), so a backend call that
/// blocks (a slow disk, a remote server) never holds up the requests behind it, and threads beyond the idle limit
/// exit. A device operation that completes asynchronously does not hold a thread at all: the reply is written
/// by its continuation. Each request owns the buffer it was read into until its reply, built in that same buffer,
/// is written: the data of a WRITE is used in place and a READ's data lands right behind the reply header, so the
/// synchronous path allocates nothing.
/// </remarks>
internal sealed partial class FuseSession
{
    private readonly FuseDevice _device;
    private readonly BlockDeviceFile _file;
    private readonly FuseMountOptions _options;
    private readonly ILogger _logger;
    private readonly string _mountPoint;
    private readonly RequestBufferPool _buffers;
    private readonly CancellationTokenSource _abort = new();
    private readonly TaskCompletionSource<FuseConnectionInfo> _initialized = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _completed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly int _maxIdle;
    private readonly Func<bool> _isEnded;

    private int _threads;
    private int _idle;

    // Reader threads plus requests completing asynchronously; the session is over when it drops to zero.
    private int _activity;
    private volatile bool _ended;
    private long _requests;

    public FuseSession(FuseDevice device, BlockDeviceFile file, FuseMountOptions options, string mountPoint, ILogger logger)
    {
        _device = device;
        _file = file;
        _options = options;
        _mountPoint = mountPoint;
        _logger = logger;
        _maxIdle = options.MinThreads + 2;
        _isEnded = () => _ended;
        _buffers = new RequestBufferPool(options.MaxTransfer + FuseConstants.HeaderRoom, options.MaxInFlight);
    }

    /// <summary>Completes with the negotiated parameters once the kernel's INIT is answered.</summary>
    public Task<FuseConnectionInfo> Initialized => _initialized.Task;

    /// <summary>Completes when the connection has ended (unmounted or aborted) and every request is answered.</summary>
    public Task Completion => _completed.Task;

    /// <summary>Whether the kernel has ended the connection.</summary>
    public bool Ended => _ended;

    public long RequestCount => Interlocked.Read(ref _requests);

    public int ThreadCount => Volatile.Read(ref _threads);

    public BlockDeviceFile File => _file;

    /// <summary>Starts the reader threads. Call after the mount: before it, /dev/fuse has no connection to read.</summary>
    public void Start()
    {
        for (var i = 0; i < _options.MinThreads; i++)
        {
            TryStartReader(force: true);
        }
    }

    /// <summary>Cancels device operations in flight (they are answered with an error); used when aborting.</summary>
    public void CancelOperations()
    {
        try
        {
            _abort.Cancel();
        }
        catch (ObjectDisposedException)
        {
        }
    }

    private bool TryStartReader(bool force)
    {
        var threads = Volatile.Read(ref _threads);
        for (var attempt = 0; attempt < 64; attempt++)
        {
            if (_ended || (!force && threads >= _options.MaxThreads))
            {
                return false;
            }

            var seen = Interlocked.CompareExchange(ref _threads, threads + 1, threads);
            if (seen == threads)
            {
                Interlocked.Increment(ref _activity);
                var thread = new Thread(ReaderLoop)
                {
                    IsBackground = true,
                    Name = "spindle-fuse",
                };
                thread.Start();
                return true;
            }

            threads = seen;
        }

        return false;
    }

    private bool TryRetire()
    {
        var threads = Volatile.Read(ref _threads);
        for (var attempt = 0; attempt < 64 && threads > _options.MinThreads; attempt++)
        {
            var seen = Interlocked.CompareExchange(ref _threads, threads - 1, threads);
            if (seen == threads)
            {
                return true;
            }

            threads = seen;
        }

        return false;
    }

    private void ReaderLoop()
    {
        byte[]? buffer = null;
        var retired = false;
        try
        {
            while (!_ended)
            {
                buffer ??= _buffers.Rent(_isEnded);
                if (buffer is null)
                {
                    break;
                }

                Interlocked.Increment(ref _idle);
                var length = _device.Read(buffer);
                var idle = Interlocked.Decrement(ref _idle);
                if (length < 0)
                {
                    if (HandleReadError(-length))
                    {
                        continue;
                    }

                    break;
                }

                if (idle == 0)
                {
                    // Nobody else is waiting for requests while this one is served: keep one reader ready.
                    TryStartReader(force: false);
                }

                Interlocked.Increment(ref _requests);
                if (Dispatch(buffer, length))
                {
                    // The request went asynchronous and took the buffer with it.
                    buffer = null;
                }

                if (Volatile.Read(ref _idle) >= _maxIdle && TryRetire())
                {
                    retired = true;
                    break;
                }
            }
        }
        finally
        {
            if (buffer is not null)
            {
                _buffers.Return(buffer);
            }

            if (!retired)
            {
                Interlocked.Decrement(ref _threads);
            }

            LeaveActivity();
        }
    }

    /// <summary>Whether to read again after a failed read().</summary>
    private bool HandleReadError(int errno)
    {
        switch (errno)
        {
            case Errno.EINTR or Errno.EAGAIN:
                return true;
            case Errno.ENOENT:
                // The request was interrupted before we took it.
                return true;
            case Errno.ENODEV:
                // Unmounted or aborted: the connection is gone.
                _ended = true;
                return false;
            default:
                FuseLog.DeviceReadFailed(_logger, _mountPoint, Errno.Describe(errno));
                _ended = true;
                return false;
        }
    }

    private void LeaveActivity()
    {
        if (Interlocked.Decrement(ref _activity) == 0)
        {
            _ended = true;
            _initialized.TrySetException(new FuseMountException(Errno.ENOTCONN, $"{_mountPoint}: the FUSE connection ended before INIT"));
            _buffers.Dispose();
            _abort.Dispose();
            _completed.TrySetResult();
        }
    }

    /// <summary>Writes a reply whose payload (if any) already sits at <see cref="FuseOutHeader.Size"/> in the buffer.</summary>
    private void Send(byte[] buffer, ulong unique, int error, int payloadLength)
    {
        var length = FuseOutHeader.Size + (error == 0 ? payloadLength : 0);
        var header = new FuseOutHeader { Length = (uint)length, Error = -error, Unique = unique };
        MemoryMarshal.Write(buffer, in header);
        var errno = _device.Write(buffer, length);
        if (errno is not 0 and not Errno.ENOENT and not Errno.ENODEV)
        {
            FuseLog.ReplyFailed(_logger, _mountPoint, Errno.Describe(errno));
        }
    }

    /// <summary>
    /// Tells the kernel that a node's attributes changed (the file grew), so the next stat(2) asks again instead of
    /// answering from its cache (FUSE_NOTIFY_INVAL_INODE with offset -1: attributes only, cached pages kept). Returns
    /// 0 or the errno of the write (ENOENT: the kernel has not looked the node up yet, nothing to invalidate).
    /// </summary>
    internal int NotifyAttributesChanged(ulong nodeId)
    {
        var buffer = new byte[FuseOutHeader.Size + FuseNotifyInvalidateInode.Size];
        var header = new FuseOutHeader { Length = (uint)buffer.Length, Error = FuseConstants.NotifyInvalidateInode, Unique = 0 };
        MemoryMarshal.Write(buffer, in header);
        var notice = new FuseNotifyInvalidateInode { NodeId = nodeId, Offset = -1, Length = 0 };
        MemoryMarshal.Write(buffer.AsSpan(FuseOutHeader.Size), in notice);
        return _device.Write(buffer, buffer.Length);
    }

    private void SendError(byte[] buffer, ulong unique, int errno) => Send(buffer, unique, errno, 0);

    private void SendStruct<T>(byte[] buffer, ulong unique, in T value)
        where T : struct
    {
        MemoryMarshal.Write(buffer.AsSpan(FuseOutHeader.Size), in value);
        Send(buffer, unique, 0, Unsafe.SizeOf<T>());
    }
}
