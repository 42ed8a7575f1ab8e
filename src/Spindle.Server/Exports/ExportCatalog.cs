namespace Spindle.Server.Exports;

/// <summary>The exports a server offers, by name.</summary>
public sealed class ExportCatalog : IAsyncDisposable
{
    private readonly Dictionary<string, Export> _exports = new(StringComparer.Ordinal);
    private readonly List<Export> _ordered = [];
    private readonly List<DirectoryExportProvider> _directories = [];
    private readonly Lock _lock = new();

    /// <summary>
    /// The export a client gets when it asks for the empty name. Null: the export literally named "" if any.
    /// </summary>
    public string? DefaultExportName { get; set; }

    public IReadOnlyList<Export> Exports
    {
        get
        {
            lock (_lock)
            {
                return _ordered.ToArray();
            }
        }
    }

    /// <summary>Directories of images served on demand (looked up after the named exports).</summary>
    public IReadOnlyList<DirectoryExportProvider> Directories
    {
        get
        {
            lock (_lock)
            {
                return _directories.ToArray();
            }
        }
    }

    public void Add(DirectoryExportProvider directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        lock (_lock)
        {
            _directories.Add(directory);
        }
    }

    public void Add(Export export)
    {
        ArgumentNullException.ThrowIfNull(export);
        lock (_lock)
        {
            foreach (var other in _ordered)
            {
                if (other.Uuid == export.Uuid || (export.Options.Label is { } label && other.Options.Label == label) ||
                    (export.Options.Serial is { } serial && other.Options.Serial == serial))
                {
                    throw new ArgumentException($"exports '{other.Name}' and '{export.Name}' share a UUID, label or serial; stable names must be unique", nameof(export));
                }
            }

            if (!_exports.TryAdd(export.Name, export))
            {
                throw new ArgumentException($"an export named '{export.Name}' already exists", nameof(export));
            }

            _ordered.Add(export);
        }
    }

    /// <summary>Looks up an export by the name a client sent.</summary>
    public bool TryGet(string name, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out Export? export)
    {
        lock (_lock)
        {
            if (_exports.TryGetValue(name, out export))
            {
                return true;
            }

            if (name.Length == 0 && DefaultExportName is { } fallback)
            {
                return _exports.TryGetValue(fallback, out export);
            }

            // Stable names: by-uuid/, by-label/, by-serial/ (names taken literally by an export win above).
            export = FindByAlias(name);
            return export is not null;
        }
    }

    /// <summary>
    /// Whether aliases (by-uuid/...) are listed by NBD_OPT_LIST next to the names. Default: false: tools that list
    /// exports resolve each name to its canonical name, so aliases would show as duplicates. Clients learn an
    /// export's stable names with NBD_OPT_LIST_META_CONTEXT and the query <c>x-spindle:</c> instead.
    /// </summary>
    public bool ListAliases { get; set; }

    private Export? FindByAlias(string name)
    {
        if (name.StartsWith(ExportIdentity.ByUuid, StringComparison.Ordinal))
        {
            return Guid.TryParse(name.AsSpan(ExportIdentity.ByUuid.Length), out var uuid) ? _ordered.FirstOrDefault(e => e.Uuid == uuid) : null;
        }

        if (name.StartsWith(ExportIdentity.ByLabel, StringComparison.Ordinal))
        {
            var label = name[ExportIdentity.ByLabel.Length..];
            return _ordered.FirstOrDefault(e => string.Equals(e.Options.Label, label, StringComparison.Ordinal));
        }

        if (name.StartsWith(ExportIdentity.BySerial, StringComparison.Ordinal))
        {
            var serial = name[ExportIdentity.BySerial.Length..];
            return _ordered.FirstOrDefault(e => string.Equals(e.Options.Serial, serial, StringComparison.Ordinal));
        }

        return null;
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var export in Exports)
        {
            await export.DisposeAsync().ConfigureAwait(false);
        }

        foreach (var directory in Directories)
        {
            await directory.DisposeAsync().ConfigureAwait(false);
        }
    }
}
