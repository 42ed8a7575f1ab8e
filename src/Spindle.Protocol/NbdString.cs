using System.Text;

namespace Spindle.Protocol;

/// <summary>
/// The protocol's string rules: UTF-8, no NUL, at most 4096 bytes ("Conventions" in proto.md).
/// </summary>
public static class NbdString
{
    private static readonly UTF8Encoding Strict = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>
    /// Decodes a protocol string, refusing invalid UTF-8, embedded NUL and anything over 4096 bytes.
    /// </summary>
    public static bool TryDecode(ReadOnlySpan<byte> bytes, out string value, out string? problem)
    {
        value = string.Empty;
        if (bytes.Length > NbdLimits.MaxStringLength)
        {
            problem = $"string of {bytes.Length} bytes is longer than the protocol's 4096-byte limit";
            return false;
        }

        if (bytes.Contains((byte)0))
        {
            problem = "string contains a NUL byte";
            return false;
        }

        try
        {
            value = Strict.GetString(bytes);
        }
        catch (DecoderFallbackException)
        {
            problem = "string is not valid UTF-8";
            return false;
        }

        problem = null;
        return true;
    }

    /// <summary>The UTF-8 byte count of <paramref name="value"/>.</summary>
    public static int ByteCount(string value) => Encoding.UTF8.GetByteCount(value);

    /// <summary>Encodes <paramref name="value"/> as UTF-8 into <paramref name="destination"/>.</summary>
    public static int Encode(string value, Span<byte> destination) => Encoding.UTF8.GetBytes(value, destination);

    /// <summary>Throws if <paramref name="value"/> breaks the protocol's string rules.</summary>
    public static void Validate(string value, string parameterName)
    {
        ArgumentNullException.ThrowIfNull(value, parameterName);
        if (value.Contains('\0', StringComparison.Ordinal))
        {
            throw new ArgumentException("NBD strings must not contain NUL.", parameterName);
        }

        if (ByteCount(value) > NbdLimits.MaxStringLength)
        {
            throw new ArgumentException("NBD strings must be at most 4096 bytes of UTF-8.", parameterName);
        }
    }
}
