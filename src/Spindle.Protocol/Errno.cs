using System.Runtime.InteropServices;

namespace Spindle.Protocol;

/// <summary>
/// Linux errno values (asm-generic/errno-base.h and errno.h, the same on x86-64 and arm64) and how they map onto NBD
/// errors: the one errno table for the server, the backends, the client and the FUSE layer. NBD's own error values
/// are errno numbers (proto.md "Error values"), so the table sits beside them.
/// </summary>
public static class Errno
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EINTR = 4;
    public const int EIO = 5;
    public const int ENXIO = 6;
    public const int EBADF = 9;
    public const int EAGAIN = 11;
    public const int ENOMEM = 12;
    public const int EACCES = 13;
    public const int EBUSY = 16;
    public const int EEXIST = 17;
    public const int EXDEV = 18;
    public const int ENODEV = 19;
    public const int ENOTDIR = 20;
    public const int EISDIR = 21;
    public const int EINVAL = 22;
    public const int EFBIG = 27;
    public const int ENOSPC = 28;
    public const int EROFS = 30;
    public const int EPIPE = 32;
    public const int ERANGE = 34;
    public const int ENOSYS = 38;
    public const int ELOOP = 40;
    public const int ENODATA = 61;
    public const int EPROTO = 71;
    public const int EOVERFLOW = 75;
    public const int EOPNOTSUPP = 95;
    public const int ENOTSUP = EOPNOTSUPP;
    public const int ECONNRESET = 104;
    public const int ENOTCONN = 107;
    public const int ESHUTDOWN = 108;
    public const int ETIMEDOUT = 110;
    public const int EDQUOT = 122;

    /// <summary>
    /// The NBD error a failed system call reports: ENOSPC, EDQUOT and EFBIG become ENOSPC as the spec asks for a
    /// full device; EROFS, EACCES and EPERM become EPERM; EINVAL stays; EOPNOTSUPP, ENOSYS and ENODEV become ENOTSUP;
    /// anything else is EIO.
    /// </summary>
    public static NbdError ToNbdError(int errno) => errno switch
    {
        ENOSPC or EDQUOT or EFBIG => NbdError.NoSpace,
        EPERM or EACCES or EROFS => NbdError.NotPermitted,
        EINVAL => NbdError.InvalidArgument,
        EOPNOTSUPP or ENOSYS or ENODEV => NbdError.NotSupported,
        _ => NbdError.IO,
    };

    /// <summary>The errno a local caller (FUSE, a device) sees for an NBD error; unknown values are EIO.</summary>
    public static int FromNbdError(NbdError error) => error switch
    {
        NbdError.NotPermitted => EPERM,
        NbdError.OutOfMemory => ENOMEM,
        NbdError.InvalidArgument => EINVAL,
        NbdError.NoSpace => ENOSPC,
        NbdError.Overflow => EOVERFLOW,
        NbdError.NotSupported => EOPNOTSUPP,
        NbdError.Shutdown => ESHUTDOWN,
        _ => EIO,
    };

    /// <summary>The system's message for an errno ("Transport endpoint is not connected").</summary>
    public static string Describe(int errno) => Marshal.GetPInvokeErrorMessage(errno);
}
