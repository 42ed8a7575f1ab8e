using Spindle.Protocol;

namespace Spindle.Client;

/// <summary>
/// Base of every failure the NBD client reports about the server or the connection. Derives from
/// <see cref="IOException"/>: to a caller it is an I/O error on a remote disk.
/// </summary>
/// <remarks>
/// Requests the client refuses before sending them (out of range, misaligned, a command the export does not offer)
/// throw the ordinary argument exceptions or <see cref="NotSupportedException"/> instead: those are the caller's
/// mistakes, not the server's.
/// </remarks>
public class NbdException : IOException
{
    public NbdException()
    {
    }

    public NbdException(string message)
        : base(message)
    {
    }

    public NbdException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}

/// <summary>
/// The server answered a request with an error (a simple reply with a non-zero error, or an ERROR / ERROR_OFFSET
/// chunk). The connection is still usable.
/// </summary>
public sealed class NbdServerErrorException : NbdException
{
    public NbdServerErrorException()
    {
    }

    public NbdServerErrorException(string message)
        : base(message)
    {
    }

    public NbdServerErrorException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    public NbdServerErrorException(NbdCommand command, ulong offset, long length, NbdError error, string? serverMessage, ulong? errorOffset)
        : base(Describe(command, offset, length, error, serverMessage, errorOffset))
    {
        Command = command;
        Error = error;
        ServerMessage = serverMessage;
        ErrorOffset = errorOffset;
    }

    public NbdCommand Command { get; }

    /// <summary>The error as sent (an unknown value is kept; <see cref="NbdErrorNames.Normalize"/> maps it to EINVAL).</summary>
    public NbdError Error { get; }

    /// <summary>The human-readable message of an error chunk, if the server sent one.</summary>
    public string? ServerMessage { get; }

    /// <summary>For ERROR_OFFSET chunks: the offset at which the error happened.</summary>
    public ulong? ErrorOffset { get; }

    private static string Describe(NbdCommand command, ulong offset, long length, NbdError error, string? serverMessage, ulong? errorOffset)
    {
        var text = $"server failed {CommandName(command)} at offset {offset} length {length}: {error.ToErrnoName()}";
        if (errorOffset is { } at)
        {
            text += $" at offset {at}";
        }

        return string.IsNullOrEmpty(serverMessage) ? text : $"{text} ({serverMessage})";
    }

    internal static string CommandName(NbdCommand command) => command switch
    {
        NbdCommand.Read => "READ",
        NbdCommand.Write => "WRITE",
        NbdCommand.Disconnect => "DISC",
        NbdCommand.Flush => "FLUSH",
        NbdCommand.Trim => "TRIM",
        NbdCommand.Cache => "CACHE",
        NbdCommand.WriteZeroes => "WRITE_ZEROES",
        NbdCommand.BlockStatus => "BLOCK_STATUS",
        NbdCommand.Resize => "RESIZE",
        _ => $"command {(ushort)command}",
    };
}

/// <summary>
/// The connection failed or could not be made: refused, reset, closed by the server (mid-request too), or a
/// protocol violation. Every request in flight on it fails with this exception.
/// </summary>
public class NbdConnectionException : NbdException
{
    public NbdConnectionException()
    {
    }

    public NbdConnectionException(string message)
        : base(message)
    {
    }

    public NbdConnectionException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}

/// <summary>The server broke the protocol (bad magic, unknown cookie, inconsistent chunk...); the client hung up.</summary>
public sealed class NbdProtocolException : NbdConnectionException
{
    public NbdProtocolException()
    {
    }

    public NbdProtocolException(string message)
        : base(message)
    {
    }

    public NbdProtocolException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}

/// <summary>The server refused an option during negotiation (no such export, policy, TLS required...).</summary>
public sealed class NbdOptionException : NbdException
{
    public NbdOptionException()
    {
    }

    public NbdOptionException(string message)
        : base(message)
    {
    }

    public NbdOptionException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    public NbdOptionException(NbdOption option, OptionReplyType reply, string message)
        : base(message)
    {
        Option = option;
        Reply = reply;
    }

    public NbdOption Option { get; }

    /// <summary>The NBD_REP_ERR_* the server answered with.</summary>
    public OptionReplyType Reply { get; }
}

/// <summary>
/// TLS failed or was refused: the server does not offer it for an <c>nbds</c> URI (the client then refuses to go on
/// in plain text), the server requires it of a plain <c>nbd</c> URI (NBD_REP_ERR_TLS_REQD), a certificate was
/// rejected (the server's by the client, or the client's by the server), or the TLS settings are unusable.
/// </summary>
public sealed class NbdTlsException : NbdException
{
    public NbdTlsException()
        : base("TLS failed")
    {
    }

    public NbdTlsException(string message)
        : base(message)
    {
    }

    public NbdTlsException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}
