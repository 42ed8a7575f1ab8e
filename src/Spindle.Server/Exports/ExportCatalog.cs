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

    /// <summary>
    /// Takes an export out of the catalog while the server runs: new clients no longer find it; the connections it
    /// has finish what they have in flight, then get ESHUTDOWN (a client that reconnects goes elsewhere); its device is
    /// flushed and released when the last of them is gone (<see cref="Export.Released"/>).
    /// </summary>
    /// <returns>The export removed, or null if there is none by that name.</returns>
    public Export? Remove(string name)
    {
        Export? export;
        lock (_lock)
        {
            if (!_exports.Remove(name, out export))
            {
                return null;
            }

            _ordered.Remove(export);
        }

        export.Retire(drain: true);
        return export;
    }

    /// <summary>
    /// Puts a changed version of an export in place of the one with the same name: clients that connect from now on
    /// get <paramref name="replacement"/>; those already connected keep the old version until they disconnect (its
    /// device is then released, unless it is shared through <see cref="Export.WithOptions"/>).
    /// </summary>
    /// <returns>The export replaced.</returns>
    public Export Replace(Export replacement)
    {
        ArgumentNullException.ThrowIfNull(replacement);
        Export old;
        lock (_lock)
        {
            if (!_exports.TryGetValue(replacement.Name, out old!))
            {
                throw new ArgumentException($"there is no export named '{replacement.Name}' to replace", nameof(replacement));
            }

            foreach (var other in _ordered)
            {
                if (other != old && (other.Uuid == replacement.Uuid || (replacement.Options.Label is { } label && other.Options.Label == label) ||
                    (replacement.Options.Serial is { } serial && other.Options.Serial == serial)))
                {
                    throw new ArgumentException($"exports '{other.Name}' and '{replacement.Name}' share a UUID, label or serial; stable names must be unique", nameof(replacement));
                }
            }

            replacement.ContinueStatisticsOf(old);
            _exports[replacement.Name] = replacement;
            _ordered[_ordered.IndexOf(old)] = replacement;
        }

        old.Retire(drain: false);
        return old;
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
