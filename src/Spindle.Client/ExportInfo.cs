using Spindle.Protocol;

namespace Spindle.Client;

/// <summary>How a connection entered the transmission phase.</summary>
public enum NegotiationMethod
{
    /// <summary>NBD_OPT_GO (the modern way, with NBD_REP_INFO details).</summary>
    Go,

    /// <summary>NBD_OPT_EXPORT_NAME: the server did not know GO, or the client was told not to use it.</summary>
    ExportName,
}

/// <summary>
/// An export's stable names, learned from the aliases a server lists (<c>by-uuid/UUID</c>, <c>by-label/LABEL</c>,
/// <c>by-serial/SERIAL</c>) whose NBD_INFO_NAME is the export's canonical name. Any of them may be null.
/// </summary>
public sealed record ExportIdentity(string? Uuid, string? Label, string? Serial)
{
    public const string UuidPrefix = StableNames.ByUuid;
    public const string LabelPrefix = StableNames.ByLabel;
    public const string SerialPrefix = StableNames.BySerial;

    public bool IsEmpty => Uuid is null && Label is null && Serial is null;

    public override string ToString() =>
        string.Join(", ", new[] { ("uuid", Uuid), ("label", Label), ("serial", Serial) }.Where(p => p.Item2 is not null).Select(p => $"{p.Item1} {p.Item2}"));
}

/// <summary>What a client learned about an export during negotiation.</summary>
public sealed record ExportInfo
{
    /// <summary>The export name the client asked for.</summary>
    public required string Name { get; init; }

    /// <summary>The canonical name the server sent with NBD_INFO_NAME, if it did.</summary>
    public string? CanonicalName { get; init; }

    /// <summary>The description the server sent with NBD_INFO_DESCRIPTION (or with LIST), if any.</summary>
    public string? Description { get; init; }

    public long Size { get; init; }

    /// <summary>The transmission flags, cleaned of combinations the spec forbids (see <see cref="RawFlags"/>).</summary>
    public TransmissionFlags Flags { get; init; }

    /// <summary>The transmission flags exactly as the server sent them.</summary>
    public TransmissionFlags RawFlags { get; init; }

    /// <summary>The block size constraints the server advertised with NBD_INFO_BLOCK_SIZE, or null.</summary>
    public BlockSizeConstraints? AdvertisedBlockSizes { get; init; }

    /// <summary>Offsets and lengths must be multiples of this (1 when nothing was advertised).</summary>
    public uint MinimumBlockSize => AdvertisedBlockSizes?.Minimum ?? 1;

    /// <summary>The request size the server prefers (4096 when nothing was advertised).</summary>
    public uint PreferredBlockSize => AdvertisedBlockSizes?.Preferred ?? NbdLimits.DefaultPreferredBlockSize;

    /// <summary>The largest READ or WRITE payload the client will send on this export.</summary>
    public int MaximumPayload { get; init; } = NbdLimits.DefaultMaxPayload;

    public HandshakeFlags HandshakeFlags { get; init; }

    public bool FixedNewstyle => (HandshakeFlags & HandshakeFlags.FixedNewstyle) != 0;

    public NegotiationMethod Method { get; init; }

    public bool StructuredReplies { get; init; }

    /// <summary>True when extended headers were negotiated: 32-byte requests and replies, 64-bit lengths.</summary>
    public bool ExtendedHeaders { get; init; }

    /// <summary>True when a BLOCK_STATUS may name the contexts to answer (NBD_FLAG_BLOCK_STATUS_PAYLOAD).</summary>
    public bool CanFilterBlockStatus => Has(TransmissionFlags.BlockStatusPayload);

    /// <summary>The metadata contexts selected on the connection, by name, with the ids the server gave them.</summary>
    public IReadOnlyDictionary<string, uint> MetaContexts { get; init; } = new Dictionary<string, uint>();

    /// <summary>The contexts the server said it offers (NBD_OPT_LIST_META_CONTEXT), when the client asked.</summary>
    public IReadOnlyList<string>? AvailableMetaContexts { get; init; }

    /// <summary>
    /// The export's stable names, when the client asked for them (<see cref="NbdClientOptions.DiscoverIdentity"/>)
    /// and the server lists such aliases; null otherwise.
    /// </summary>
    public ExportIdentity? Identity { get; init; }

    /// <summary>True when the connection runs over TLS.</summary>
    public bool Tls { get; init; }

    public bool IsReadOnly => Has(TransmissionFlags.ReadOnly);

    public bool CanFlush => Has(TransmissionFlags.SendFlush);

    public bool CanFua => Has(TransmissionFlags.SendFua);

    public bool IsRotational => Has(TransmissionFlags.Rotational);

    public bool CanTrim => Has(TransmissionFlags.SendTrim);

    public bool CanWriteZeroes => Has(TransmissionFlags.SendWriteZeroes);

    public bool CanDontFragment => Has(TransmissionFlags.SendDf);

    public bool CanMultiConn => Has(TransmissionFlags.CanMultiConn);

    public bool CanCache => Has(TransmissionFlags.SendCache);

    public bool CanFastZero => Has(TransmissionFlags.SendFastZero);

    /// <summary>True when BLOCK_STATUS can be asked for <c>base:allocation</c>.</summary>
    public bool CanBlockStatus => MetaContexts.ContainsKey(Protocol.MetaContexts.BaseAllocation);

    private bool Has(TransmissionFlags flag) => (Flags & flag) != 0;

    /// <summary>
    /// Applies the spec's rules to advertised flags: without HAS_FLAGS nothing else counts; DF needs structured
    /// replies; FAST_ZERO needs WRITE_ZEROES; BLOCK_STATUS_PAYLOAD needs extended headers.
    /// </summary>
    internal static TransmissionFlags Sanitize(TransmissionFlags flags, bool structuredReplies, bool extendedHeaders = false)
    {
        if ((flags & TransmissionFlags.HasFlags) == 0)
        {
            return TransmissionFlags.None;
        }

        if (!structuredReplies)
        {
            flags &= ~TransmissionFlags.SendDf;
        }

        if ((flags & TransmissionFlags.SendWriteZeroes) == 0)
        {
            flags &= ~TransmissionFlags.SendFastZero;
        }

        return extendedHeaders ? flags : flags & ~TransmissionFlags.BlockStatusPayload;
    }
}

/// <summary>One export named by NBD_OPT_LIST, with the details NBD_OPT_INFO gave (null if the server refused INFO).</summary>
public sealed record ExportListing(string Name, string? Description, ExportInfo? Info, string? InfoError);

/// <summary>The export's size before and after it grew on the server (<see cref="NbdClient.SizeChanged"/>).</summary>
public sealed class ExportSizeChangedEventArgs(long oldSize, long newSize) : EventArgs
{
    /// <summary>The size the client had.</summary>
    public long OldSize { get; } = oldSize;

    /// <summary>The size every connection negotiated now.</summary>
    public long NewSize { get; } = newSize;
}
