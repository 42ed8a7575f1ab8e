using System.Text;
using Microsoft.Win32.SafeHandles;
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

    /// <summary>
    /// Turns each opened file into the device served. Default: null, every image is served as raw bytes
    /// (<see cref="FileBlockDevice"/>). The host sets it to serve image formats (qcow2) without the server
    /// depending on their assemblies; it must dispose <see cref="DirectoryImage.Handle"/> if it throws.
    /// </summary>
    public Func<DirectoryImage, BlockDevice>? OpenImage { get; init; }
}

/// <summary>An image file opened beneath a directory export's root, handed to <see cref="DirectoryExportOptions.OpenImage"/>.</summary>
/// <param name="Handle">The file, opened with openat2(RESOLVE_BENEATH); the device takes ownership.</param>
/// <param name="Path">Root and relative name joined: for messages and to resolve names relative to the image.</param>
/// <param name="ReadOnly">Whether the export is read-only (the handle is then opened read-only).</param>
/// <param name="OpenBeneathRoot">
/// Opens another file, read-only, by full path, only if it lies beneath the same root (a backing file); throws
/// <see cref="UnauthorizedAccessException"/> for anything outside, <see cref="FileNotFoundException"/> when missing.
/// </param>
public sealed record DirectoryImage(SafeFileHandle Handle, string Path, bool ReadOnly, Func<string, SafeFileHandle> OpenBeneathRoot);

/// <summary>The result of looking an export name up in a directory.</summary>
public readonly record struct DirectoryResolution(Export? Export, bool Matched, string? Problem);

/// <summary>
/// Serves a directory of images. Export names are untrusted: they are checked (no <c>..</c>, no absolute paths, no NUL
/// or control characters, no over-long names) and then opened with openat2(RESOLVE_BENEATH), so nothing outside the
/// root is ever touched, whatever symlinks it contains. Opened images are shared by the connections using them and
/// closed when the last one leaves.
/// </summary>
public sealed partial class DirectoryExportProvider : IAsyncDisposable
{
    /// <summary>The longest export name accepted for a directory export, in bytes.</summary>
    public const int MaxNameLength = 1024;

    private const int MaxComponentLength = 255;

    private readonly Dictionary<string, (Export Export, int References)> _open = new(StringComparer.Ordinal);
    private readonly Dictionary<string, Task> _closing = new(StringComparer.Ordinal);
    private readonly Lock _lock = new();
    private readonly SemaphoreSlim _opening = new(1, 1);

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
        if (TryShare(key) is { } shared)
        {
            return new DirectoryResolution(shared, true, null);
        }

        // One image is opened at a time: two instances of one qcow2 image (two connections racing to open it)
        // would each believe they own its metadata.
        if (!_opening.Wait(CloseWait))
        {
            return new DirectoryResolution(null, true, "another image is being opened; try again");
        }

        try
        {
            Task? closing;
            lock (_lock)
            {
                if (TryShare(key) is { } opened)
                {
                    return new DirectoryResolution(opened, true, null);
                }

                if (_open.Count >= Options.MaxOpenImages)
                {
                    return new DirectoryResolution(null, true, $"{Options.MaxOpenImages} images are already open from this directory");
                }

                _closing.TryGetValue(key, out closing);
            }

            // The last user of this image left a moment ago (NBD_OPT_INFO then NBD_OPT_GO does that) and its close
            // (flush, then for qcow2 the bitmaps and header written back) is still running: a second instance of the
            // same image must not start before the first has finished with the file.
            if (closing is not null && !closing.Wait(CloseWait))
            {
                return new DirectoryResolution(null, true, "the image is still being closed; try again");
            }

            var export = Open(root, relative, name, out problem);
            if (export is null)
            {
                return new DirectoryResolution(null, true, problem);
            }

            lock (_lock)
            {
                _open[key] = (export, 1);
            }

            return new DirectoryResolution(export, true, null);
        }
        finally
        {
            _opening.Release();
        }
    }

    /// <summary>The open export of <paramref name="key"/> with one more reference, or null.</summary>
    private Export? TryShare(string key)
    {
        lock (_lock)
        {
            if (_open.TryGetValue(key, out var entry))
            {
                _open[key] = (entry.Export, entry.References + 1);
                return entry.Export;
            }

            return null;
        }
    }

    /// <summary>Gives back a reference from <see cref="Resolve"/>; the last one closes the image.</summary>
    public void Release(Export export)
    {
        ArgumentNullException.ThrowIfNull(export);
        lock (_lock)
        {
            foreach (var (key, entry) in _open)
            {
                if (ReferenceEquals(entry.Export, export))
                {
                    if (entry.References <= 1)
                    {
                        _open.Remove(key);

                        // Flushing here keeps "close" meaning "on disk": the image may be opened again by someone else
                        // next. Resolve waits for it before opening the same image again.
                        var previous = _closing.GetValueOrDefault(key) ?? Task.CompletedTask;
                        Task task = null!;
                        task = previous.ContinueWith(_ => CloseAsync(export), CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default).Unwrap()
                            .ContinueWith(_ => Forget(key, task), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
                        _closing[key] = task;
                    }
                    else
                    {
                        _open[key] = (entry.Export, entry.References - 1);
                    }

                    break;
                }
            }
        }

    }

    /// <summary>How long opening an image waits for an earlier instance of it to finish closing.</summary>
    private static readonly TimeSpan CloseWait = TimeSpan.FromSeconds(30);

    private void Forget(string key, Task closing)
    {
        lock (_lock)
        {
            if (_closing.TryGetValue(key, out var current) && ReferenceEquals(current, closing))
            {
                _closing.Remove(key);
            }
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
        Task[] closing;
        lock (_lock)
        {
            exports = _open.Values.Select(e => e.Export).ToArray();
            _open.Clear();
            closing = _closing.Values.ToArray();
        }

        foreach (var export in exports)
        {
            await CloseAsync(export).ConfigureAwait(false);
        }

        await Task.WhenAll(closing).ConfigureAwait(false);
        _opening.Dispose();
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
}
