using System.Runtime.InteropServices;
using Spindle.Fuse.Kernel;
using Spindle.Fuse.Logging;
using Spindle.Protocol;

namespace Spindle.Fuse;

internal sealed partial class FuseSession
{
    // The flags asked for at INIT. ASYNC_READ and ASYNC_DIO let the kernel keep many reads and direct I/Os in
    // flight (a loop device in direct-I/O mode submits asynchronously), MAX_PAGES raises the request size past
    // 128 KiB, DIRECT_IO_ALLOW_MMAP keeps mmap working on the direct-I/O file. No WRITEBACK_CACHE: a write is
    // acknowledged only once the device has it, so a crash of this process loses nothing that was acknowledged.
    private const FuseInitFlags WantedFlags = FuseInitFlags.AsyncRead | FuseInitFlags.BigWrites | FuseInitFlags.AsyncDio |
                                              FuseInitFlags.MaxPages | FuseInitFlags.InitExt | FuseInitFlags.DirectIoAllowMmap;

    private const int WriteDataOffset = FuseInHeader.Size + FuseWriteIn.Size;

    /// <summary>Serves one request. Returns true when it went asynchronous and owns the buffer from now on.</summary>
    private bool Dispatch(byte[] buffer, int length)
    {
        if (length < FuseInHeader.Size)
        {
            FuseLog.MalformedRequest(_logger, _mountPoint, "short", length);
            return false;
        }

        var header = MemoryMarshal.Read<FuseInHeader>(buffer);
        var unique = header.Unique;
        if (header.Length != (uint)length)
        {
            FuseLog.MalformedRequest(_logger, _mountPoint, header.Opcode.ToString(), length);
            SendError(buffer, unique, Errno.EINVAL);
            return false;
        }

        var arguments = buffer.AsSpan(FuseInHeader.Size, length - FuseInHeader.Size);
        try
        {
            switch (header.Opcode)
            {
                case FuseOpcode.Init:
                    HandleInit(buffer, unique, arguments);
                    return false;
                case FuseOpcode.Forget or FuseOpcode.BatchForget or FuseOpcode.Interrupt:
                    // No reply. Node ids never change here, so lookups need no counting; an interrupted request
                    // is simply completed (the kernel accepts the late reply or discards it).
                    return false;
                case FuseOpcode.Destroy:
                    SendError(buffer, unique, 0);
                    return false;
                case FuseOpcode.Lookup:
                    {
                        var errno = _file.Lookup(header.NodeId, arguments, out var entry);
                        Reply(buffer, unique, errno, in entry);
                        return false;
                    }

                case FuseOpcode.GetAttr:
                    {
                        var errno = _file.GetAttr(header.NodeId, out var attributes);
                        Reply(buffer, unique, errno, in attributes);
                        return false;
                    }

                case FuseOpcode.SetAttr:
                    {
                        if (!TryRead(arguments, out FuseSetAttrIn change))
                        {
                            return Malformed(buffer, header);
                        }

                        var errno = _file.SetAttr(header.NodeId, in change, out var attributes);
                        Reply(buffer, unique, errno, in attributes);
                        return false;
                    }

                case FuseOpcode.Open:
                    {
                        if (!TryRead(arguments, out FuseOpenIn open))
                        {
                            return Malformed(buffer, header);
                        }

                        var errno = _file.Open(header.NodeId, open.Flags, out var opened);
                        Reply(buffer, unique, errno, in opened);
                        return false;
                    }

                case FuseOpcode.OpenDir:
                    {
                        var errno = _file.OpenDirectory(header.NodeId, out var opened);
                        Reply(buffer, unique, errno, in opened);
                        return false;
                    }

                case FuseOpcode.Release:
                    {
                        if (TryRead(arguments, out FuseReleaseIn release))
                        {
                            _file.Release(release.Handle);
                        }

                        SendError(buffer, unique, 0);
                        return false;
                    }

                case FuseOpcode.ReleaseDir or FuseOpcode.FsyncDir or FuseOpcode.Flush:
                    // FLUSH is close(): it promises no durability (fsync does), so it costs no device round trip.
                    SendError(buffer, unique, 0);
                    return false;
                case FuseOpcode.Read:
                    return HandleRead(buffer, header, arguments);
                case FuseOpcode.Write:
                    return HandleWrite(buffer, header, length);
                case FuseOpcode.Fsync or FuseOpcode.SyncFs:
                    return Complete(_file.FlushAsync(_abort.Token), buffer, new Pending(unique, header.Opcode, 0, 0, 0));
                case FuseOpcode.Fallocate:
                    return HandleFallocate(buffer, header, arguments);
                case FuseOpcode.LSeek:
                    return HandleSeek(buffer, header, arguments);
                case FuseOpcode.ReadDir:
                    {
                        if (!TryRead(arguments, out FuseReadIn read))
                        {
                            return Malformed(buffer, header);
                        }

                        if (header.NodeId != FuseConstants.RootNodeId)
                        {
                            SendError(buffer, unique, Errno.ENOTDIR);
                            return false;
                        }

                        var room = (int)Math.Min(read.Length, (uint)(buffer.Length - FuseOutHeader.Size));
                        var used = _file.ReadDirectory(read.Offset, buffer.AsSpan(FuseOutHeader.Size, room));
                        Send(buffer, unique, 0, used);
                        return false;
                    }

                case FuseOpcode.StatFs:
                    {
                        var statistics = _file.StatFs();
                        SendStruct(buffer, unique, in statistics);
                        return false;
                    }

                case FuseOpcode.Create or FuseOpcode.MkNod or FuseOpcode.MkDir or FuseOpcode.Symlink or FuseOpcode.Link or
                    FuseOpcode.Unlink or FuseOpcode.RmDir or FuseOpcode.Rename or FuseOpcode.Rename2 or FuseOpcode.TmpFile:
                    // The directory holds exactly the device's file.
                    SendError(buffer, unique, _file.ReadOnly ? Errno.EROFS : Errno.EPERM);
                    return false;
                default:
                    // ENOSYS makes the kernel stop asking (xattrs, locks, ioctl, poll, statx, copy_file_range...)
                    // and fall back to its generic behaviour where it has one.
                    SendError(buffer, unique, Errno.ENOSYS);
                    return false;
            }
        }
        catch (Exception exception)
        {
            FuseLog.HandlerFailed(_logger, _mountPoint, header.Opcode.ToString(), exception);
            SendError(buffer, unique, Errno.EIO);
            return false;
        }
    }

    private void HandleInit(byte[] buffer, ulong unique, ReadOnlySpan<byte> arguments)
    {
        if (arguments.Length < FuseInitIn.CompatSize)
        {
            SendError(buffer, unique, Errno.EPROTO);
            return;
        }

        Span<byte> padded = stackalloc byte[FuseInitIn.Size];
        padded.Clear();
        arguments[..Math.Min(arguments.Length, FuseInitIn.Size)].CopyTo(padded);
        var init = MemoryMarshal.Read<FuseInitIn>(padded);

        if (init.Major > FuseConstants.KernelVersion)
        {
            // The kernel answers a reply with the older major by sending INIT again in that version.
            var older = new FuseInitOut { Major = FuseConstants.KernelVersion, Minor = FuseConstants.MaxMinorVersion };
            SendStruct(buffer, unique, in older);
            return;
        }

        if (init.Major < FuseConstants.KernelVersion || init.Minor < FuseConstants.MinMinorVersion)
        {
            FuseLog.KernelTooOld(_logger, _mountPoint, init.Major, init.Minor, FuseConstants.MinMinorVersion);
            SendError(buffer, unique, Errno.EPROTO);
            _initialized.TrySetException(new FuseMountException(Errno.EPROTO,
                $"the kernel speaks FUSE {init.Major}.{init.Minor}; Spindle needs 7.{FuseConstants.MinMinorVersion} or newer"));
            return;
        }

        var offered = (FuseInitFlags)init.Flags;
        if ((offered & FuseInitFlags.InitExt) != 0)
        {
            offered |= (FuseInitFlags)((ulong)init.Flags2 << 32);
        }

        var granted = offered & WantedFlags;
        var pageSize = Environment.SystemPageSize;
        var maxPages = (granted & FuseInitFlags.MaxPages) != 0 ? Math.Min(_options.MaxTransfer / pageSize, ushort.MaxValue) : 32;
        var maxWrite = (uint)Math.Min(_options.MaxTransfer, maxPages * pageSize);
        var reply = new FuseInitOut
        {
            Major = FuseConstants.KernelVersion,
            Minor = Math.Min(init.Minor, FuseConstants.MaxMinorVersion),
            MaxReadahead = Math.Min(init.MaxReadahead, (uint)_options.MaxTransfer),
            Flags = (uint)granted,
            Flags2 = (uint)((ulong)granted >> 32),
            MaxBackground = (ushort)_options.MaxBackground,
            CongestionThreshold = (ushort)Math.Max(1, _options.MaxBackground * 3 / 4),
            MaxWrite = maxWrite,
            TimeGranularity = 1,
            MaxPages = (ushort)maxPages,
        };
        SendStruct(buffer, unique, in reply);
        _initialized.TrySetResult(new FuseConnectionInfo(init.Major, init.Minor, reply.Minor, maxWrite, maxPages, granted));
    }

    private bool HandleRead(byte[] buffer, in FuseInHeader header, ReadOnlySpan<byte> arguments)
    {
        if (!TryRead(arguments, out FuseReadIn read))
        {
            return Malformed(buffer, header);
        }

        if (header.NodeId != BlockDeviceFile.FileNodeId)
        {
            SendError(buffer, header.Unique, Errno.EISDIR);
            return false;
        }

        var count = Math.Min(_file.ClampRead(read.Offset, read.Length), buffer.Length - FuseOutHeader.Size);
        if (count == 0)
        {
            Send(buffer, header.Unique, 0, 0);
            return false;
        }

        var pending = new Pending(header.Unique, FuseOpcode.Read, (long)read.Offset, count, count);
        ValueTask operation;
        try
        {
            operation = _file.ReadAsync((long)read.Offset, buffer.AsMemory(FuseOutHeader.Size, count), _abort.Token);
        }
        catch (Exception exception)
        {
            Fail(buffer, pending, exception);
            return false;
        }

        return Complete(operation, buffer, pending);
    }

    private bool HandleWrite(byte[] buffer, in FuseInHeader header, int length)
    {
        if (!TryRead(buffer.AsSpan(FuseInHeader.Size, length - FuseInHeader.Size), out FuseWriteIn write) ||
            (long)WriteDataOffset + write.Length > length)
        {
            return Malformed(buffer, header);
        }

        var errno = _file.ClampWrite(write.Offset, write.Length, out var count);
        if (errno != 0 || count == 0)
        {
            if (errno == 0)
            {
                var written = default(FuseWriteOut);
                SendStruct(buffer, header.Unique, in written);
            }
            else
            {
                SendError(buffer, header.Unique, errno);
            }

            return false;
        }

        // O_SYNC/O_DSYNC on the handle, or RWF_DSYNC on this write: the kernel sets O_DSYNC in the write's flags.
        var fua = (write.Flags & FuseConstants.ODsync) != 0 || _file.IsSyncHandle(write.Handle);
        var pending = new Pending(header.Unique, FuseOpcode.Write, (long)write.Offset, count, count);
        ValueTask operation;
        try
        {
            operation = _file.WriteAsync((long)write.Offset, buffer.AsMemory(WriteDataOffset, count), fua, _abort.Token);
        }
        catch (Exception exception)
        {
            Fail(buffer, pending, exception);
            return false;
        }

        return Complete(operation, buffer, pending);
    }

    private bool HandleFallocate(byte[] buffer, in FuseInHeader header, ReadOnlySpan<byte> arguments)
    {
        if (!TryRead(arguments, out FuseFallocateIn fallocate))
        {
            return Malformed(buffer, header);
        }

        var pending = new Pending(header.Unique, FuseOpcode.Fallocate, (long)fallocate.Offset, (long)fallocate.Length, 0);
        int errno;
        ValueTask operation;
        try
        {
            errno = _file.Fallocate(fallocate.Mode, fallocate.Offset, fallocate.Length, _abort.Token, out operation);
        }
        catch (Exception exception)
        {
            Fail(buffer, pending, exception);
            return false;
        }

        if (errno != 0)
        {
            SendError(buffer, header.Unique, errno);
            return false;
        }

        return Complete(operation, buffer, pending);
    }

    private bool HandleSeek(byte[] buffer, in FuseInHeader header, ReadOnlySpan<byte> arguments)
    {
        if (!TryRead(arguments, out FuseLSeekIn seek))
        {
            return Malformed(buffer, header);
        }

        var pending = new Pending(header.Unique, FuseOpcode.LSeek, (long)seek.Offset, 0, 0);
        ValueTask<(int Errno, long Offset)> operation;
        try
        {
            operation = _file.SeekAsync(seek.Offset, seek.Whence, _abort.Token);
        }
        catch (Exception exception)
        {
            Fail(buffer, pending, exception);
            return false;
        }

        if (operation.IsCompleted)
        {
            try
            {
                ReplySeek(buffer, pending.Unique, operation.Result);
            }
            catch (Exception exception)
            {
                Fail(buffer, pending, exception);
            }

            return false;
        }

        Interlocked.Increment(ref _activity);
        _ = CompleteSeekAsync(operation, buffer, pending);
        return true;
    }

    private async Task CompleteSeekAsync(ValueTask<(int Errno, long Offset)> operation, byte[] buffer, Pending pending)
    {
        try
        {
            ReplySeek(buffer, pending.Unique, await operation.ConfigureAwait(false));
        }
        catch (Exception exception)
        {
            Fail(buffer, pending, exception);
        }
        finally
        {
            _buffers.Return(buffer);
            LeaveActivity();
        }
    }

    private void ReplySeek(byte[] buffer, ulong unique, (int Errno, long Offset) result)
    {
        if (result.Errno != 0)
        {
            SendError(buffer, unique, result.Errno);
            return;
        }

        var reply = new FuseLSeekOut { Offset = (ulong)result.Offset };
        SendStruct(buffer, unique, in reply);
    }

    /// <summary>Replies at once if the device finished synchronously, else hands the buffer to a continuation.</summary>
    private bool Complete(ValueTask operation, byte[] buffer, Pending pending)
    {
        if (operation.IsCompleted)
        {
            try
            {
                operation.GetAwaiter().GetResult();
                Succeed(buffer, pending);
            }
            catch (Exception exception)
            {
                Fail(buffer, pending, exception);
            }

            return false;
        }

        Interlocked.Increment(ref _activity);
        _ = CompleteAsync(operation, buffer, pending);
        return true;
    }

    private async Task CompleteAsync(ValueTask operation, byte[] buffer, Pending pending)
    {
        try
        {
            await operation.ConfigureAwait(false);
            Succeed(buffer, pending);
        }
        catch (Exception exception)
        {
            Fail(buffer, pending, exception);
        }
        finally
        {
            _buffers.Return(buffer);
            LeaveActivity();
        }
    }

    private void Succeed(byte[] buffer, Pending pending)
    {
        switch (pending.Opcode)
        {
            case FuseOpcode.Read:
                Send(buffer, pending.Unique, 0, pending.PayloadLength);
                break;
            case FuseOpcode.Write:
                var written = new FuseWriteOut { Length = (uint)pending.PayloadLength };
                SendStruct(buffer, pending.Unique, in written);
                break;
            default:
                Send(buffer, pending.Unique, 0, 0);
                break;
        }
    }

    private void Fail(byte[] buffer, Pending pending, Exception exception)
    {
        var errno = BlockDeviceFile.ToErrno(exception);
        if (exception is not OperationCanceledException)
        {
            FuseLog.OperationFailed(_logger, _mountPoint, pending.Opcode.ToString(), pending.Offset, pending.Length, Errno.Describe(errno), exception.Message);
        }

        SendError(buffer, pending.Unique, errno);
    }

    private void Reply<T>(byte[] buffer, ulong unique, int errno, in T value)
        where T : struct
    {
        if (errno != 0)
        {
            SendError(buffer, unique, errno);
        }
        else
        {
            SendStruct(buffer, unique, in value);
        }
    }

    private bool Malformed(byte[] buffer, in FuseInHeader header)
    {
        FuseLog.MalformedRequest(_logger, _mountPoint, header.Opcode.ToString(), (int)header.Length);
        SendError(buffer, header.Unique, Errno.EINVAL);
        return false;
    }

    private static bool TryRead<T>(ReadOnlySpan<byte> arguments, out T value)
        where T : struct
    {
        if (arguments.Length < System.Runtime.CompilerServices.Unsafe.SizeOf<T>())
        {
            value = default;
            return false;
        }

        value = MemoryMarshal.Read<T>(arguments);
        return true;
    }

    /// <summary>What a reply needs once the device is done.</summary>
    private readonly record struct Pending(ulong Unique, FuseOpcode Opcode, long Offset, long Length, int PayloadLength);
}
