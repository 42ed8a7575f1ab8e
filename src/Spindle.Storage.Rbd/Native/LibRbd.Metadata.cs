using System.Runtime.InteropServices;

namespace Spindle.Storage.Rbd.Native;

/// <summary>
/// librbd's image metadata calls (<c>rbd/librbd.h</c>): string keys and values kept in the image's header object, each
/// call synchronous and durable on the OSDs when it returns. The dirty bitmaps of RBD exports live there.
/// </summary>
internal static unsafe partial class LibRbd
{
    /// <summary>rbd_metadata_get: the value, NUL-terminated; -ERANGE with <paramref name="length"/> set when the buffer is short; -ENOENT when absent.</summary>
    [LibraryImport(Library, EntryPoint = "rbd_metadata_get", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int MetadataGet(nint image, string key, byte* value, ref nuint length);

    [LibraryImport(Library, EntryPoint = "rbd_metadata_set", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int MetadataSet(nint image, string key, string value);

    [LibraryImport(Library, EntryPoint = "rbd_metadata_remove", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int MetadataRemove(nint image, string key);
}
