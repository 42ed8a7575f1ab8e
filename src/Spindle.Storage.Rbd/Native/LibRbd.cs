using System.Runtime.InteropServices;

namespace Spindle.Storage.Rbd.Native;

/// <summary>
/// librbd's C API as Spindle uses it (signatures from <c>rbd/librbd.h</c>). Results are 0 (or a byte count) on
/// success and a negative errno on failure. An <c>rbd_aio_*</c> call that returns an error never fires its
/// completion; one that returns 0 always does, exactly once, on a librbd thread.
/// </summary>
internal static unsafe partial class LibRbd
{
    /// <summary>The soname Debian's librbd1 installs; the C API carries no symbol versions.</summary>
    public const string Library = "librbd.so.1";

    /// <summary>RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: zero by writing (the range stays allocated), not by discarding.</summary>
    public const int WriteZeroesThickProvision = 1 << 0;

    /// <summary>RBD_FEATURE_FAST_DIFF: the object map also records which objects changed, so diffs need no OSD reads.</summary>
    public const ulong FeatureFastDiff = 1UL << 4;

    /// <summary>RBD_FLAG_FAST_DIFF_INVALID: the fast-diff data cannot be trusted (it needs a rebuild).</summary>
    public const ulong FlagFastDiffInvalid = 1UL << 1;

    [LibraryImport(Library, EntryPoint = "rbd_version")]
    public static partial void Version(out int major, out int minor, out int extra);

    [LibraryImport(Library, EntryPoint = "rbd_aio_open", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int AioOpen(nint ioctx, string name, nint* image, string? snapName, nint completion);

    /// <summary>rbd_aio_open_read_only: no header watch and no lock; writes fail with -EROFS.</summary>
    [LibraryImport(Library, EntryPoint = "rbd_aio_open_read_only", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int AioOpenReadOnly(nint ioctx, string name, nint* image, string? snapName, nint completion);

    /// <summary>rbd_close: waits for in-flight requests, flushes and releases the image.</summary>
    [LibraryImport(Library, EntryPoint = "rbd_close")]
    public static partial int Close(nint image);

    [LibraryImport(Library, EntryPoint = "rbd_get_size")]
    public static partial int GetSize(nint image, out ulong size);

    /// <summary>
    /// rbd_update_watch: <paramref name="callback"/>(argument) runs on a librbd thread after the image's header changed
    /// (a resize, a snapshot, a feature change), as another client's notification arrives. librbd reads the new header
    /// lazily, at the next call that needs it (rbd_get_size among them).
    /// </summary>
    [LibraryImport(Library, EntryPoint = "rbd_update_watch")]
    public static partial int UpdateWatch(nint image, out ulong handle, delegate* unmanaged<nint, void> callback, nint argument);

    /// <summary>rbd_update_unwatch: after it returns the callback no longer runs; must come before rbd_close.</summary>
    [LibraryImport(Library, EntryPoint = "rbd_update_unwatch")]
    public static partial int UpdateUnwatch(nint image, ulong handle);

    [LibraryImport(Library, EntryPoint = "rbd_get_features")]
    public static partial int GetFeatures(nint image, out ulong features);

    [LibraryImport(Library, EntryPoint = "rbd_get_flags")]
    public static partial int GetFlags(nint image, out ulong flags);

    [LibraryImport(Library, EntryPoint = "rbd_aio_create_completion")]
    public static partial int AioCreateCompletion(nint argument, delegate* unmanaged<nint, nint, void> callback, out nint completion);

    [LibraryImport(Library, EntryPoint = "rbd_aio_get_return_value")]
    public static partial nint AioGetReturnValue(nint completion);

    [LibraryImport(Library, EntryPoint = "rbd_aio_release")]
    public static partial void AioRelease(nint completion);

    [LibraryImport(Library, EntryPoint = "rbd_aio_read")]
    public static partial int AioRead(nint image, ulong offset, nuint length, byte* buffer, nint completion);

    [LibraryImport(Library, EntryPoint = "rbd_aio_write")]
    public static partial int AioWrite(nint image, ulong offset, nuint length, byte* buffer, nint completion);

    [LibraryImport(Library, EntryPoint = "rbd_aio_flush")]
    public static partial int AioFlush(nint image, nint completion);

    /// <summary>rbd_aio_discard: with rbd_skip_partial_discard (the default) parts of objects may keep their data.</summary>
    [LibraryImport(Library, EntryPoint = "rbd_aio_discard")]
    public static partial int AioDiscard(nint image, ulong offset, ulong length, nint completion);

    /// <summary>rbd_aio_write_zeroes: the whole range reads as zeroes afterwards, aligned or not.</summary>
    [LibraryImport(Library, EntryPoint = "rbd_aio_write_zeroes")]
    public static partial int AioWriteZeroes(nint image, ulong offset, nuint length, nint completion, int zeroFlags, int opFlags);

    /// <summary>
    /// rbd_diff_iterate2 from the beginning of time (<paramref name="fromSnapName"/> null): calls
    /// <paramref name="callback"/>(offset, length, exists, argument) for allocated regions, on the calling thread.
    /// A negative return from the callback stops the iteration and becomes the result.
    /// </summary>
    [LibraryImport(Library, EntryPoint = "rbd_diff_iterate2", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int DiffIterate2(nint image, string? fromSnapName, ulong offset, ulong length, byte includeParent, byte wholeObject,
        delegate* unmanaged<ulong, nuint, int, nint, int> callback, nint argument);
}
