namespace Spindle.Fuse;

/// <summary>Mounting or unmounting failed; <see cref="Errno"/> says why in the system's terms.</summary>
public sealed class FuseMountException : Exception
{
    public FuseMountException(int errno, string message)
        : base(message) => Errno = errno;

    public FuseMountException(int errno, string message, Exception innerException)
        : base(message, innerException) => Errno = errno;

    public FuseMountException()
        : this(Spindle.Protocol.Errno.EIO, "mount failed")
    {
    }

    public FuseMountException(string message)
        : this(Spindle.Protocol.Errno.EIO, message)
    {
    }

    public FuseMountException(string message, Exception innerException)
        : this(Spindle.Protocol.Errno.EIO, message, innerException)
    {
    }

    /// <summary>The errno behind the failure (ENOENT: no such directory, EBUSY: already mounted, EPERM: not allowed...).</summary>
    public int Errno { get; }
}
