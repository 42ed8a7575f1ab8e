namespace Spindle.Protocol;

/// <summary>Magic numbers of the NBD protocol (proto.md, "Values"; the reference sheet §1).</summary>
public static class NbdMagic
{
    /// <summary>"NBDMAGIC": the first 8 bytes the server sends.</summary>
    public const ulong InitPassword = 0x4e42444d41474943;

    /// <summary>"IHAVEOPT": the server's second 8 bytes, and the first 8 bytes of every client option.</summary>
    public const ulong OptionMagic = 0x49484156454F5054;

    /// <summary>The oldstyle handshake's second magic (cliserv_magic); recognised, never spoken.</summary>
    public const ulong OldstyleMagic = 0x00420281861253;

    /// <summary>First 8 bytes of every fixed-newstyle option reply. Not IHAVEOPT.</summary>
    public const ulong OptionReplyMagic = 0x0003e889045565a9;

    public const uint RequestMagic = 0x25609513;

    /// <summary>NBD_EXTENDED_REQUEST_MAGIC: every request once extended headers were negotiated (§8).</summary>
    public const uint ExtendedRequestMagic = 0x21e41c71;

    public const uint SimpleReplyMagic = 0x67446698;
    public const uint StructuredReplyMagic = 0x668e33ef;

    /// <summary>NBD_EXTENDED_REPLY_MAGIC: every reply chunk once extended headers were negotiated (§8).</summary>
    public const uint ExtendedReplyMagic = 0x6e8a278c;
}

/// <summary>Protocol-wide sizes and limits.</summary>
public static class NbdLimits
{
    /// <summary>The IANA port for NBD.</summary>
    public const int DefaultPort = 10809;

    /// <summary>No protocol string (export name, description, message, context name) may be longer.</summary>
    public const int MaxStringLength = 4096;

    /// <summary>
    /// 2^25: the payload every server should accept whatever it advertises, and the largest READ or WRITE a
    /// portable client sends (proto.md, "Block size constraints").
    /// </summary>
    public const int DefaultMaxPayload = 32 * 1024 * 1024;

    /// <summary>The default preferred block size when none is advertised.</summary>
    public const int DefaultPreferredBlockSize = 4096;

    /// <summary>The largest minimum block size the spec allows.</summary>
    public const int MaxMinimumBlockSize = 65536;

    /// <summary>A DF read of up to this many bytes must be served unfragmented.</summary>
    public const int DontFragmentGuarantee = 65536;

    /// <summary>The spec's recommended ceiling on extents in one block status chunk.</summary>
    public const int MaxExtentsPerChunk = 1 << 20;

    /// <summary>The zero padding after an EXPORT_NAME reply unless NO_ZEROES was agreed.</summary>
    public const int ExportNameReplyPadding = 124;

    /// <summary>The fixed-size part of a compact request.</summary>
    public const int RequestHeaderLength = 28;

    /// <summary>The fixed-size part of an extended request (64-bit length).</summary>
    public const int ExtendedRequestHeaderLength = 32;

    public const int SimpleReplyHeaderLength = 16;
    public const int StructuredReplyHeaderLength = 20;

    /// <summary>An extended reply chunk header: the structured one plus the echoed offset and a 64-bit length.</summary>
    public const int ExtendedReplyHeaderLength = 32;

    public const int OptionHeaderLength = 16;
    public const int OptionReplyHeaderLength = 20;
    public const int ServerGreetingLength = 18;
}

/// <summary>Handshake flags sent by the server after the magics (16 bits).</summary>
[Flags]
public enum HandshakeFlags : ushort
{
    None = 0,
    FixedNewstyle = 1 << 0,
    NoZeroes = 1 << 1,
}

/// <summary>Client flags sent in reply to the greeting (32 bits).</summary>
[Flags]
public enum ClientFlags : uint
{
    None = 0,
    FixedNewstyle = 1 << 0,
    NoZeroes = 1 << 1,
}

/// <summary>NBD_OPT_* option codes.</summary>
public enum NbdOption : uint
{
    ExportName = 1,
    Abort = 2,
    List = 3,
    PeekExport = 4,
    StartTls = 5,
    Info = 6,
    Go = 7,
    StructuredReply = 8,
    ListMetaContext = 9,
    SetMetaContext = 10,
    ExtendedHeaders = 11,
}

/// <summary>NBD_REP_* option reply types. Errors have bit 31 set.</summary>
public enum OptionReplyType : uint
{
    Ack = 1,
    Server = 2,
    Info = 3,
    MetaContext = 4,

    ErrorUnsupported = 0x80000001,
    ErrorPolicy = 0x80000002,
    ErrorInvalid = 0x80000003,
    ErrorPlatform = 0x80000004,
    ErrorTlsRequired = 0x80000005,
    ErrorUnknown = 0x80000006,
    ErrorShutdown = 0x80000007,
    ErrorBlockSizeRequired = 0x80000008,
    ErrorTooBig = 0x80000009,
    ErrorExtendedHeaderRequired = 0x8000000a,
}

/// <summary>NBD_INFO_* information types carried in NBD_REP_INFO.</summary>
public enum InfoType : ushort
{
    Export = 0,
    Name = 1,
    Description = 2,
    BlockSize = 3,
}

/// <summary>Transmission flags (16 bits) sent with the export size.</summary>
[Flags]
public enum TransmissionFlags : ushort
{
    None = 0,
    HasFlags = 1 << 0,
    ReadOnly = 1 << 1,
    SendFlush = 1 << 2,
    SendFua = 1 << 3,
    Rotational = 1 << 4,
    SendTrim = 1 << 5,
    SendWriteZeroes = 1 << 6,
    SendDf = 1 << 7,
    CanMultiConn = 1 << 8,
    SendResize = 1 << 9,
    SendCache = 1 << 10,
    SendFastZero = 1 << 11,
    BlockStatusPayload = 1 << 12,
}

/// <summary>NBD_CMD_* request types.</summary>
public enum NbdCommand : ushort
{
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
    Resize = 8,
}

/// <summary>NBD_CMD_FLAG_* request flags.</summary>
[Flags]
public enum CommandFlags : ushort
{
    None = 0,
    Fua = 1 << 0,
    NoHole = 1 << 1,
    DontFragment = 1 << 2,
    RequestOne = 1 << 3,
    FastZero = 1 << 4,
    PayloadLength = 1 << 5,
}

/// <summary>Structured reply chunk flags.</summary>
[Flags]
public enum ReplyFlags : ushort
{
    None = 0,
    Done = 1 << 0,
}

/// <summary>NBD_REPLY_TYPE_* structured reply chunk types. Error chunks have bit 15 set.</summary>
public enum ReplyType : ushort
{
    None = 0,
    OffsetData = 1,
    OffsetHole = 2,
    BlockStatus = 5,
    BlockStatusExtended = 6,
    Error = 0x8001,
    ErrorOffset = 0x8002,
}

/// <summary>NBD_E* error values, the only ones allowed on the wire.</summary>
public enum NbdError : uint
{
    None = 0,
    NotPermitted = 1,
    IO = 5,
    OutOfMemory = 12,
    InvalidArgument = 22,
    NoSpace = 28,
    Overflow = 75,
    NotSupported = 95,
    Shutdown = 108,
}

/// <summary>Flags of the <c>base:allocation</c> metadata context.</summary>
[Flags]
public enum AllocationFlags : uint
{
    /// <summary>Allocated data (or status unknown).</summary>
    Data = 0,

    /// <summary>NBD_STATE_HOLE: not allocated.</summary>
    Hole = 1 << 0,

    /// <summary>NBD_STATE_ZERO: reads as zeroes.</summary>
    Zero = 1 << 1,
}

/// <summary>Well-known metadata context names.</summary>
public static class MetaContexts
{
    public const string BaseNamespace = "base:";
    public const string BaseAllocation = "base:allocation";

    /// <summary>qemu's dirty bitmaps, <c>qemu:dirty-bitmap:NAME</c>: status bit 0 set where the bitmap is dirty.</summary>
    public const string DirtyBitmapPrefix = "qemu:dirty-bitmap:";
}

/// <summary>
/// How Spindle names an export by what it is rather than by its place: the export-name aliases
/// <c>by-uuid/UUID</c>, <c>by-label/LABEL</c> and <c>by-serial/SERIAL</c>, and the descriptive meta contexts a
/// server answers to NBD_OPT_LIST_META_CONTEXT with the query <c>x-spindle:</c> (<c>x-spindle:uuid=UUID</c>,
/// <c>x-spindle:label=LABEL</c>, <c>x-spindle:serial=SERIAL</c>). Server and client both speak it from here.
/// </summary>
public static class StableNames
{
    public const string ByUuid = "by-uuid/";
    public const string ByLabel = "by-label/";
    public const string BySerial = "by-serial/";

    /// <summary>The meta-context namespace (and the query) that carries the stable names.</summary>
    public const string MetaNamespace = "x-spindle:";

    public const string UuidKey = "uuid";
    public const string LabelKey = "label";
    public const string SerialKey = "serial";

    /// <summary>The meta-context name for one stable name, e.g. <c>x-spindle:uuid=...</c>.</summary>
    public static string MetaContext(string key, string value) => $"{MetaNamespace}{key}={value}";

    /// <summary>Splits a meta-context name made by <see cref="MetaContext"/>; false for any other name.</summary>
    public static bool TryParseMetaContext(string name, out string key, out string value)
    {
        ArgumentNullException.ThrowIfNull(name);
        var equals = name.IndexOf('=', StringComparison.Ordinal);
        if (!name.StartsWith(MetaNamespace, StringComparison.Ordinal) || equals < MetaNamespace.Length)
        {
            key = value = string.Empty;
            return false;
        }

        key = name[MetaNamespace.Length..equals];
        value = name[(equals + 1)..];
        return true;
    }
}
