using Spindle.Protocol;
using Spindle.Storage.Native;

namespace Spindle.Storage;

/// <summary>Maps Linux errno values (as carried by an <see cref="IOException"/>'s HResult on Unix) to NBD errors.</summary>
public static class Errno
{
    /// <summary>ENOSPC, EDQUOT and EFBIG become ENOSPC as the spec asks; EROFS, EACCES and EPERM become EPERM.</summary>
    public static NbdError ToNbdError(int errno) => LinuxFile.ToNbdError(errno);
}
