namespace Spindle.Storage.Qcow2;

/// <summary>
/// An image that cannot be opened as asked: not qcow2, corrupt or truncated metadata, or a feature this backend
/// refuses (encryption, an external data file, an unknown incompatible feature bit). The message says which.
/// </summary>
public sealed class Qcow2FormatException : IOException
{
    public Qcow2FormatException()
        : base("invalid qcow2 image")
    {
    }

    public Qcow2FormatException(string message)
        : base(message)
    {
    }

    public Qcow2FormatException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}
