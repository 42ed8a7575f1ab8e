using System.Text;
using Spindle.Protocol;
using Spindle.Storage;

namespace Spindle.Server.Exports;

/// <summary>
/// How a directory of images is served: every regular file or block device beneath <see cref="Root"/> becomes an
/// export named by its relative path (after <see cref="Prefix"/>), opened when a client asks for it (RNBD's device
/// search path). <see cref="Root"/> may contain <c>%SESSNAME%</c>, replaced by the client's session name so each
/// client sees only its own directory.
/// </summary>
public sealed class DirectoryExportOptions
{
    public const string SessionPlaceholder = "%SESSNAME%";

    /// <summary>The directory, possibly with <c>%SESSNAME%</c> in it.</summary>
    public required string Root { get; init; }

    /// <summary>Export names are <c>Prefix/relative/path</c>; empty: just the relative path.</summary>
    public string Prefix { get; init; } = string.Empty;

    /// <summary>Flags, access rules, TLS, limits and read-only mode (RNBD's open mode) shared by every image.</summary>
    public ExportOptions Template { get; init; } = new();

    /// <summary>The most images open at once from this directory. Default: 256.</summary>
    public int MaxOpenImages { get; init; } = 256;

    /// <summary>The most entries a LIST reports. Default: 1000.</summary>
    public int MaxListed { get; init; } = 1000;

    public bool UsesSessions => Root.Contains(SessionPlaceholder, StringComparison.Ordinal);
}

/// <summary>The result of looking an export name up in a directory.</summary>
public readonly record struct DirectoryResolution(Export? Export, bool Matched, string? Problem);

/// <summary>
/// Serves a directory of images. Export names are untrusted: they are checked (no <c>..</c>, no absolute paths, no NUL
/// or control characters, no over-long names) and then opened with openat2(RESOLVE_BENEATH), so nothing outside the
/// root is ever touched, whatever symlinks it contains. Opened images are shared by the connections using them and
/// closed when the last one leaves.
/// </summary>
public sealed class DirectoryExportProvider : IAsyncDisposable
{
    /// <summary>The longest export name accepted for a directory export, in bytes.</summary>
    public const int MaxNameLength = 1024;

    private const int MaxComponentLength = 255;

    private readonly Dictionary<string, (Export Export, int References)> _open = new(StringComparer.Ordinal);
    private readonly Lock _lock = new();

    public DirectoryExportProvider(DirectoryExportOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        Options = options;
        if (!options.UsesSessions && !Directory.Exists(options.Root))
        {
            throw new DirectoryNotFoundException($"directory export root '{options.Root}' does not exist");
        }
    }

    public DirectoryExportOptions Options { get; }

    /// <summary>Images currently open.</summary>
    public int OpenCount
    {
        get
        {
            lock (_lock)
            {
                return _open.Count;
            }
        }
    }

    /// <summary>
    /// Looks <paramref name="name"/> up for a client with session <paramref name="session"/>. Not matched: the name is
    /// not under this directory's prefix. Matched without an export: refused, with the reason in Problem. A returned
    /// export holds a reference that <see cref="Release"/> gives back.
    /// </summary>
    public DirectoryResolution Resolve(string name, string? session)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (!TryStripPrefix(name, out var relative))
        {
            return new DirectoryResolution(null, false, null);
        }

        if (!IsSafeRelativeName(relative, out var problem))
        {
            return new DirectoryResolution(null, true, problem);
        }

        if (!TryGetRoot(session, out var root, out problem))
        {
            return new DirectoryResolution(null, true, problem);
        }

        var key = root + "\0" + relative;
        lock (_lock)
        {
            if (_open.TryGetValue(key, out var entry))
            {
                _open[key] = (entry.Export, entry.References + 1);
                return new DirectoryResolution(entry.Export, true, null);
            }

            if (_open.Count >= Options.MaxOpenImages)
            {
                return new DirectoryResolution(null, true, $"{Options.MaxOpenImages} images are already open from this directory");
            }
        }

        var opened = Open(root, relative, name, out problem);
        if (opened is null)
        {
            return new DirectoryResolution(null, true, problem);
        }

        lock (_lock)
        {
            if (_open.TryGetValue(key, out var raced))
            {
                // Another connection opened it meanwhile: use theirs.
                _open[key] = (raced.Export, raced.References + 1);
                _ = opened.DisposeAsync();
                return new DirectoryResolution(raced.Export, true, null);
            }

            _open[key] = (opened, 1);
            return new DirectoryResolution(opened, true, null);
        }
    }

    /// <summary>Gives back a reference from <see cref="Resolve"/>; the last one closes the image.</summary>
    public void Release(Export export)
    {
        ArgumentNullException.ThrowIfNull(export);
        Export? close = null;
        lock (_lock)
        {
            foreach (var (key, entry) in _open)
            {
                if (ReferenceEquals(entry.Export, export))
                {
                    if (entry.References <= 1)
                    {
                        _open.Remove(key);
                        close = export;
                    }
                    else
                    {
                        _open[key] = (entry.Export, entry.References - 1);
                    }

                    break;
                }
            }
        }

        if (close is not null)
        {
            // Flushing here keeps "close" meaning "on disk": the image may be opened again by someone else next.
            _ = CloseAsync(close);
        }
    }

    /// <summary>Export names a LIST shows this client: the images beneath its directory, bounded in number and depth.</summary>
    public IReadOnlyList<string> List(string? session)
    {
        if (!TryGetRoot(session, out var root, out _) || !Directory.Exists(root))
        {
            return [];
        }

        var names = new List<string>();
        var rootFull = Path.GetFullPath(root);
        var options = new EnumerationOptions { RecurseSubdirectories = true, MaxRecursionDepth = 8, IgnoreInaccessible = true, AttributesToSkip = FileAttributes.ReparsePoint };
        foreach (var file in Directory.EnumerateFiles(rootFull, "*", options))
        {
            var relative = Path.GetRelativePath(rootFull, file);
            if (IsSafeRelativeName(relative, out _))
            {
                names.Add(Options.Prefix.Length == 0 ? relative : Options.Prefix + "/" + relative);
                if (names.Count >= Options.MaxListed)
                {
                    break;
                }
            }
        }

        names.Sort(StringComparer.Ordinal);
        return names;
    }

    public async ValueTask DisposeAsync()
    {
        Export[] exports;
        lock (_lock)
        {
            exports = _open.Values.Select(e => e.Export).ToArray();
            _open.Clear();
        }

        foreach (var export in exports)
        {
            await CloseAsync(export).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// The rules for an export name used as a path: relative, UTF-8 without NUL or control characters, no empty,
    /// <c>.</c> or <c>..</c> components, at most 1024 bytes with components of at most 255.
    /// </summary>
    public static bool IsSafeRelativeName(string name, out string? problem)
    {
        if (name.Length == 0)
        {
            problem = "an empty name does not name an image";
            return false;
        }

        if (Encoding.UTF8.GetByteCount(name) > MaxNameLength)
        {
            problem = $"the name is longer than {MaxNameLength} bytes";
            return false;
        }

        foreach (var character in name)
        {
            if (char.IsControl(character))
            {
                problem = "the name contains a NUL or control character";
                return false;
            }
        }

        if (name[0] == '/')
        {
            problem = "absolute paths are not export names";
            return false;
        }

        foreach (var component in name.Split('/'))
        {
            if (component.Length == 0 || component == "." || component == "..")
            {
                problem = $"the name has an empty, '.' or '..' component";
                return false;
            }

            if (Encoding.UTF8.GetByteCount(component) > MaxComponentLength)
            {
                problem = $"a component is longer than {MaxComponentLength} bytes";
                return false;
            }
        }

        problem = null;
        return true;
    }

    /// <summary>A session name becomes one path component: it must be safe as one.</summary>
    public static bool IsSafeSessionName(string session, out string? problem)
    {
        if (!IsSafeRelativeName(session, out problem))
        {
            problem = "session name: " + problem;
            return false;
        }

        if (session.Contains('/', StringComparison.Ordinal))
        {
            problem = "session name contains '/'";
            return false;
        }

        return true;
    }

    private bool TryStripPrefix(string name, out string relative)
    {
        if (Options.Prefix.Length == 0)
        {
            relative = name;
            return true;
        }

        if (name.Length > Options.Prefix.Length + 1 && name.StartsWith(Options.Prefix, StringComparison.Ordinal) && name[Options.Prefix.Length] == '/')
        {
            relative = name[(Options.Prefix.Length + 1)..];
            return true;
        }

        relative = string.Empty;
        return false;
    }

    private bool TryGetRoot(string? session, out string root, out string? problem)
    {
        root = Options.Root;
        problem = null;
        if (!Options.UsesSessions)
        {
            return true;
        }

        if (session is null)
        {
            problem = "this directory is per session and the client has no session name (a TLS identity or a configured address)";
            return false;
        }

        if (!IsSafeSessionName(session, out problem))
        {
            return false;
        }

        root = Options.Root.Replace(DirectoryExportOptions.SessionPlaceholder, session, StringComparison.Ordinal);
        return true;
    }

    private Export? Open(string root, string relative, string name, out string? problem)
    {
        var directory = ConfinedOpen.OpenDirectory(root);
        if (directory < 0)
        {
            problem = -directory == Errno.ENOENT ? "no such image" : $"the image directory cannot be opened (errno {-directory})";
            return null;
        }

        try
        {
            var readOnly = Options.Template.ReadOnly;
            var handle = ConfinedOpen.OpenBeneath(directory, relative, readOnly, out var errno);
            if (handle is null)
            {
                problem = errno switch
                {
                    Errno.ENOENT => "no such image",
                    Errno.EXDEV or Errno.ELOOP => "the name leads outside the export directory",
                    Errno.ENOSYS => "this kernel lacks openat2, which confining names to the directory needs",
                    21 => "that name is a directory, not an image", // EISDIR
                    13 => "permission denied", // EACCES
                    _ => $"cannot open the image (errno {errno})",
                };
                return null;
            }

            var full = Path.Combine(root, relative);
            FileBlockDevice device;
            try
            {
                device = FileBlockDevice.FromHandle(handle, full, readOnly);
            }
            catch (IOException exception)
            {
                problem = exception.Message;
                return null;
            }

            var template = Options.Template;
            var options = new ExportOptions
            {
                Name = name,
                Description = template.Description,
                ReadOnly = template.ReadOnly,
                BlockSizes = template.BlockSizes,
                Rotational = template.Rotational,
                Flush = template.Flush,
                Trim = template.Trim,
                WriteZeroes = template.WriteZeroes,
                MultiConn = template.MultiConn,
                Tls = template.Tls,
                Access = template.Access,
                MaxConnections = template.MaxConnections,
            };
            problem = null;
            return new Export(options, device);
        }
        finally
        {
            ConfinedOpen.CloseDirectory(directory);
        }
    }

    private static async Task CloseAsync(Export export)
    {
        try
        {
            if (!export.IsReadOnly)
            {
                await export.Device.FlushAsync(CancellationToken.None).ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is BlockDeviceException or IOException)
        {
            // The data was acknowledged already; a failed final flush is the kernel's to retry.
        }

        await export.DisposeAsync().ConfigureAwait(false);
    }
}
