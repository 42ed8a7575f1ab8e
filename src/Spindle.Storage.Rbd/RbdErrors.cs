using System.Runtime.InteropServices;
using Spindle.Protocol;

namespace Spindle.Storage.Rbd;

/// <summary>An RBD image could not be opened: the message says why and what to check.</summary>
public sealed class RbdOpenException : Exception
{
    public RbdOpenException(string message)
        : base(message)
    {
    }

    public RbdOpenException(string message, int errno)
        : base(message) => Errno = errno;

    public RbdOpenException()
    {
    }

    public RbdOpenException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    /// <summary>The (positive) errno librados or librbd returned, or 0.</summary>
    public int Errno { get; }
}

/// <summary>librbd's negative errnos as NBD errors and readable text.</summary>
internal static class RbdErrors
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EIO = 5;
    public const int EACCES = 13;
    public const int EBUSY = 16;
    public const int EEXIST = 17;
    public const int EINVAL = 22;
    public const int EFBIG = 27;
    public const int ENOSPC = 28;
    public const int EROFS = 30;
    public const int ERANGE = 34;
    public const int ENOTSUP = 95;
    public const int ESHUTDOWN = 108;
    public const int ETIMEDOUT = 110;
    public const int EDQUOT = 122;

    /// <summary>
    /// The NBD error for a failed request: ENOSPC (and EDQUOT, EFBIG: a full pool or a quota) as ENOSPC; EROFS,
    /// EPERM and EACCES (a read-only open, a snapshot, an exclusive lock held elsewhere, missing caps) as EPERM;
    /// anything else as EIO. EINVAL and ESHUTDOWN mean something else between librbd and NBD (a blocklisted client
    /// reports ESHUTDOWN), so they are I/O errors here.
    /// </summary>
    public static NbdError ToNbdError(int errno) => errno switch
    {
        ENOSPC or EDQUOT or EFBIG => NbdError.NoSpace,
        EROFS or EPERM or EACCES => NbdError.NotPermitted,
        _ => NbdError.IO,
    };

    /// <summary>"Permission denied (EACCES)" style text for an errno.</summary>
    public static string Describe(int errno) => $"{Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})";
}
