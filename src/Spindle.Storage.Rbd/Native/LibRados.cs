using System.Runtime.InteropServices;

namespace Spindle.Storage.Rbd.Native;

/// <summary>
/// The few librados calls a client needs to reach a pool: create a handle, configure it, connect, open an I/O
/// context. Signatures follow <c>rados/librados.h</c>; every int result is 0 or a negative errno.
/// </summary>
internal static partial class LibRados
{
    /// <summary>The soname Debian's librados2 installs; the C API carries no symbol versions.</summary>
    public const string Library = "librados.so.2";

    /// <summary>rados_create2: a cluster handle for the full entity name (for example "client.admin").</summary>
    [LibraryImport(Library, EntryPoint = "rados_create2", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Create2(out nint cluster, string clusterName, string name, ulong flags);

    /// <summary>rados_conf_read_file: null searches $CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf.</summary>
    [LibraryImport(Library, EntryPoint = "rados_conf_read_file", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int ConfReadFile(nint cluster, string? path);

    /// <summary>rados_conf_parse_env: applies CEPH_ARGS when <paramref name="variable"/> is null.</summary>
    [LibraryImport(Library, EntryPoint = "rados_conf_parse_env", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int ConfParseEnv(nint cluster, string? variable);

    /// <summary>rados_conf_set: -ENOENT for an option Ceph does not know, -EINVAL for a value it cannot parse.</summary>
    [LibraryImport(Library, EntryPoint = "rados_conf_set", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int ConfSet(nint cluster, string option, string value);

    [LibraryImport(Library, EntryPoint = "rados_connect")]
    public static partial int Connect(nint cluster);

    [LibraryImport(Library, EntryPoint = "rados_shutdown")]
    public static partial void Shutdown(nint cluster);

    /// <summary>rados_ioctx_create: -ENOENT when the pool does not exist.</summary>
    [LibraryImport(Library, EntryPoint = "rados_ioctx_create", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int IoCtxCreate(nint cluster, string poolName, out nint ioctx);

    [LibraryImport(Library, EntryPoint = "rados_ioctx_destroy")]
    public static partial void IoCtxDestroy(nint ioctx);

    /// <summary>rados_ioctx_set_namespace: null or "" is the pool's default namespace.</summary>
    [LibraryImport(Library, EntryPoint = "rados_ioctx_set_namespace", StringMarshalling = StringMarshalling.Utf8)]
    public static partial void IoCtxSetNamespace(nint ioctx, string? nameSpace);
}
