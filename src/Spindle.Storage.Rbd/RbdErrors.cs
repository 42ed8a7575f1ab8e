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

    /// <summary>
    /// The NBD error for a failed request: ENOSPC (and EDQUOT, EFBIG: a full pool or a quota) as ENOSPC; EROFS,
    /// EPERM and EACCES (a read-only open, a snapshot, an exclusive lock held elsewhere, missing caps) as EPERM;
    /// anything else as EIO. EINVAL and ESHUTDOWN mean something else between librbd and NBD (a blocklisted client
    /// reports ESHUTDOWN), so they are I/O errors here.
    /// </summary>
    public static NbdError ToNbdError(int errno) => errno switch
    {
        Errno.ENOSPC or Errno.EDQUOT or Errno.EFBIG => NbdError.NoSpace,
        Errno.EROFS or Errno.EPERM or Errno.EACCES => NbdError.NotPermitted,
        _ => NbdError.IO,
    };

    /// <summary>"Permission denied (EACCES)" style text for an errno.</summary>
    public static string Describe(int errno) => $"{Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})";
}
