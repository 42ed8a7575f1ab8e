namespace Spindle.Protocol;

/// <summary>The conventional errno names of <see cref="NbdError"/> values, for messages and logs.</summary>
public static class NbdErrorNames
{
    public static string ToErrnoName(this NbdError error) => error switch
    {
        NbdError.None => "success",
        NbdError.NotPermitted => "EPERM",
        NbdError.IO => "EIO",
        NbdError.OutOfMemory => "ENOMEM",
        NbdError.InvalidArgument => "EINVAL",
        NbdError.NoSpace => "ENOSPC",
        NbdError.Overflow => "EOVERFLOW",
        NbdError.NotSupported => "ENOTSUP",
        NbdError.Shutdown => "ESHUTDOWN",
        _ => $"error {(uint)error}",
    };

    /// <summary>
    /// Maps a wire error to one this implementation understands; the spec says an unknown value is treated as EINVAL.
    /// </summary>
    public static NbdError Normalize(this NbdError error) => error switch
    {
        NbdError.None or NbdError.NotPermitted or NbdError.IO or NbdError.OutOfMemory or NbdError.InvalidArgument
            or NbdError.NoSpace or NbdError.Overflow or NbdError.NotSupported or NbdError.Shutdown => error,
        _ => NbdError.InvalidArgument,
    };
}
