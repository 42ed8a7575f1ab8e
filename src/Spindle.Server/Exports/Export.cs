using Spindle.Protocol;
using Spindle.Server.Security;
using Spindle.Storage;

namespace Spindle.Server.Exports;

/// <summary>How one export is offered; each default is what a user serving a disk expects.</summary>
public sealed class ExportOptions
{
    /// <summary>The export name clients ask for. The empty name is the default export.</summary>
    public string Name { get; set; } = string.Empty;

    /// <summary>Shown by LIST and NBD_INFO_DESCRIPTION.</summary>
    public string? Description { get; set; }

    /// <summary>Refuse writes (EPERM) even if the backend could write. Default: false.</summary>
    public bool ReadOnly { get; set; }

    /// <summary>Block size constraints to advertise; null means the backend's, else 1 / 4096 / 32 MiB.</summary>
    public BlockSizeConstraints? BlockSizes { get; set; }

    /// <summary>Advertise NBD_FLAG_ROTATIONAL. Default: false.</summary>
    public bool Rotational { get; set; }

    /// <summary>Offer FLUSH and FUA when the backend supports them. Default: true.</summary>
    public bool Flush { get; set; } = true;

    /// <summary>Offer TRIM when the backend supports it. Default: true.</summary>
    public bool Trim { get; set; } = true;

    /// <summary>Offer WRITE_ZEROES (and FAST_ZERO) when the backend supports it. Default: true.</summary>
    public bool WriteZeroes { get; set; } = true;

    /// <summary>
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Null (the default) follows the backend: on when it has no private cache,
    /// so a FLUSH on one connection covers writes made on all of them.
    /// </summary>
    public bool? MultiConn { get; set; }

    /// <summary>
    /// TLS for this export: null follows the server; <see cref="TlsMode.Require"/> makes it TLS-only, invisible to a
    /// client that has not started TLS.
    /// </summary>
    public TlsMode? Tls { get; set; }

    /// <summary>Who may use the export (addresses, TLS identities); null allows everyone who reaches the server.</summary>
    public ExportAccess? Access { get; set; }

    /// <summary>Simultaneous connections to this export; 0 (the default) means no limit but the server's.</summary>
    public int MaxConnections { get; set; }

    /// <summary>The export's UUID; null: one generated once and kept (see <see cref="ExportIdentity.Assign"/>).</summary>
    public Guid? Uuid { get; set; }

    /// <summary>An optional label, so clients can ask for <c>by-label/LABEL</c>.</summary>
    public string? Label { get; set; }

    /// <summary>An optional serial number, so clients can ask for <c>by-serial/SERIAL</c>.</summary>
    public string? Serial { get; set; }
}

/// <summary>
/// An export: a name, a backend and the transmission flags that follow from what the backend can do. An export taken
/// out of its catalog (removed or replaced) is retired: it accepts no new connection, and its device is released once
/// the connections it still has are gone.
/// </summary>
public sealed partial class Export : IAsyncDisposable
{
    private readonly TransmissionFlags _flags;
    private readonly DeviceLease _lease;
    private int _connections;
    private int _disposed;

    public Export(ExportOptions options, BlockDevice device)
        : this(options, device, new DeviceLease(device))
    {
    }

    private Export(ExportOptions options, BlockDevice device, DeviceLease lease)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(device);
        NbdString.Validate(options.Name, nameof(options));
        if (options.Description is not null)
        {
            NbdString.Validate(options.Description, nameof(options));
        }

        Options = options;
        Device = device;
        BlockSizes = options.BlockSizes ?? device.BlockSizes ?? BlockSizeConstraints.Default;
        if (!BlockSizes.IsValid(out var problem))
        {
            throw new ArgumentException($"export '{options.Name}': {problem}", nameof(options));
        }

        _flags = ComputeFlags(options, device.Features);
        _lease = lease;
    }

    /// <summary>
    /// A new export over the same device with other options (a configuration change that leaves the backend alone):
    /// connections made from now on get the new export; the device is released when neither export uses it.
    /// </summary>
    public Export WithOptions(ExportOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        _lease.Acquire();
        try
        {
            return new Export(options, Device, _lease) { Uuid = options.Uuid ?? Uuid };
        }
        catch
        {
            _ = _lease.ReleaseAsync();
            throw;
        }
    }

    public string Name => Options.Name;

    /// <summary>The UUID clients can ask for as <c>by-uuid/UUID</c> (set before the export is served).</summary>
    public Guid Uuid { get; set; } = Guid.NewGuid();

    /// <summary>The stable names this export also answers to: by-uuid/, and by-label/ and by-serial/ when set.</summary>
    public IEnumerable<string> Aliases
    {
        get
        {
            yield return ExportIdentity.ByUuid + Uuid.ToString("D");
            if (Options.Label is { Length: > 0 } label)
            {
                yield return ExportIdentity.ByLabel + label;
            }

            if (Options.Serial is { Length: > 0 } serial)
            {
                yield return ExportIdentity.BySerial + serial;
            }
        }
    }

    public string Description => Options.Description ?? string.Empty;

    public ExportOptions Options { get; }

    public BlockDevice Device { get; }

    public long Size => Device.Size;

    public BlockSizeConstraints BlockSizes { get; }

    public bool IsReadOnly => (_flags & TransmissionFlags.ReadOnly) != 0;

    /// <summary>Connections currently in transmission on this export.</summary>
    public int ConnectionCount => Math.Max(0, Volatile.Read(ref _connections));

    /// <summary>
    /// The transmission flags for a connection. SEND_DF is only set once structured replies (or extended headers)
    /// are negotiated (proto.md: it "MUST [be left] clear if structured replies have not been negotiated"), and
    /// BLOCK_STATUS_PAYLOAD only with extended headers (the extension: it "MUST NOT be advertised unless extended
    /// headers were negotiated").
    /// </summary>
    public TransmissionFlags FlagsFor(bool structuredReplies, bool extendedHeaders = false) =>
        (structuredReplies || extendedHeaders ? _flags | TransmissionFlags.SendDf : _flags) |
        (extendedHeaders ? TransmissionFlags.BlockStatusPayload : TransmissionFlags.None);

    /// <summary>Counts a connection in, unless the export's connection limit is reached or it has been retired.</summary>
    internal bool TryConnect()
    {
        var limit = Options.MaxConnections;
        while (true)
        {
            var current = Volatile.Read(ref _connections);
            if (IsRetired || current < 0)
            {
                return false;
            }

            if (limit > 0 && current >= limit)
            {
                return false;
            }

            if (Interlocked.CompareExchange(ref _connections, current + 1, current) == current)
            {
                return true;
            }
        }
    }

    internal void OnDisconnected()
    {
        if (Interlocked.Decrement(ref _connections) == 0 && IsRetired)
        {
            _ = ReleaseAfterDrainAsync();
        }
    }

    /// <summary>Releases this export's hold on the device (disposed once no export uses it).</summary>
    public ValueTask DisposeAsync() => Interlocked.Exchange(ref _disposed, 1) == 0 ? _lease.ReleaseAsync() : ValueTask.CompletedTask;

    public override string ToString() =>
        $"'{Name}' ({Device.Description}, {Size} bytes{(IsReadOnly ? ", read-only" : "")}, uuid {Uuid:D}{(Options.Label is null ? "" : ", label " + Options.Label)}{(Options.Serial is null ? "" : ", serial " + Options.Serial)})";

    private static TransmissionFlags ComputeFlags(ExportOptions options, BlockDeviceFeatures features)
    {
        bool Has(BlockDeviceFeatures feature) => (features & feature) != 0;

        var flags = TransmissionFlags.HasFlags;
        var writable = !options.ReadOnly && Has(BlockDeviceFeatures.Write);
        if (!writable)
        {
            flags |= TransmissionFlags.ReadOnly;
        }

        if (options.Flush && Has(BlockDeviceFeatures.Flush))
        {
            flags |= TransmissionFlags.SendFlush;
            if (writable && Has(BlockDeviceFeatures.Fua))
            {
                flags |= TransmissionFlags.SendFua;
            }
        }

        if (options.Rotational || Has(BlockDeviceFeatures.Rotational))
        {
            flags |= TransmissionFlags.Rotational;
        }

        if (writable && options.Trim && Has(BlockDeviceFeatures.Trim))
        {
            flags |= TransmissionFlags.SendTrim;
        }

        if (writable && options.WriteZeroes && Has(BlockDeviceFeatures.WriteZeroes))
        {
            flags |= TransmissionFlags.SendWriteZeroes;
            if (Has(BlockDeviceFeatures.FastZero))
            {
                // FAST_ZERO MUST be clear unless WRITE_ZEROES is set.
                flags |= TransmissionFlags.SendFastZero;
            }
        }

        // CACHE never changes semantics; backends without a prefetch simply do nothing.
        flags |= TransmissionFlags.SendCache;

        if (options.MultiConn ?? Has(BlockDeviceFeatures.SharedCache))
        {
            flags |= TransmissionFlags.CanMultiConn;
        }

        return flags;
    }
}
