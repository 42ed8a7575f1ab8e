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

            return false;
        }
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
