using System.Globalization;
using System.Runtime.InteropServices;
using Spindle.Protocol;
using Spindle.Storage.Rbd.Native;

namespace Spindle.Storage.Rbd;

/// <summary>
/// A librados client connected to a cluster, with an I/O context on the image's pool and namespace. Every step is
/// bounded in time: a cluster that does not answer fails the open instead of hanging it.
/// </summary>
internal sealed class RbdConnection : IDisposable
{
    private nint _cluster;
    private nint _ioctx;

    private RbdConnection(nint cluster, nint ioctx)
    {
        _cluster = cluster;
        _ioctx = ioctx;
    }

    public nint IoCtx => _ioctx;

    /// <summary>Connects as <see cref="RbdOptions.ClientId"/> and opens the image's pool.</summary>
    /// <exception cref="RbdOpenException">Anything failed; the message names the cause.</exception>
    public static RbdConnection Connect(RbdOptions options)
    {
        EnsureLibraries();
        if (options.ConfigFile is { } conf && !File.Exists(conf))
        {
            throw new RbdOpenException($"Ceph configuration file '{conf}' does not exist");
        }

        if (options.Keyring is { } keyring && !File.Exists(keyring))
        {
            throw new RbdOpenException($"keyring '{keyring}' does not exist");
        }

        var entity = "client." + options.ClientId;
        var result = LibRados.Create2(out var cluster, options.ClusterName, entity, 0);
        if (result < 0)
        {
            throw new RbdOpenException($"cannot create a Ceph client for {entity}: {RbdErrors.Describe(-result)}", -result);
        }

        try
        {
            Configure(cluster, options);
        }
        catch
        {
            LibRados.Shutdown(cluster);
            throw;
        }

        // client_mount_timeout bounds rados_connect already; a thread with its own deadline makes sure a librados
        // that ignores it still cannot hang the server's start.
        var connectResult = int.MinValue;
        var thread = new Thread(() => connectResult = LibRados.Connect(cluster)) { IsBackground = true, Name = "rados connect" };
        thread.Start();
        if (!thread.Join(options.ConnectTimeout + TimeSpan.FromSeconds(5)))
        {
            // The connect is still running inside librados: shutting the handle down under it could crash, so this
            // one handle is left behind (the open has failed and the caller reports it).
            throw new RbdOpenException($"connecting to the Ceph cluster as {entity} did not finish within {options.ConnectTimeout.TotalSeconds:0.#} s", Errno.ETIMEDOUT);
        }

        if (connectResult < 0)
        {
            LibRados.Shutdown(cluster);
            throw ConnectFailure(-connectResult, options, entity);
        }

        result = LibRados.IoCtxCreate(cluster, options.Image.Pool, out var ioctx);
        if (result < 0)
        {
            LibRados.Shutdown(cluster);
            throw new RbdOpenException(
                -result == Errno.ENOENT
                    ? $"pool '{options.Image.Pool}' does not exist (create it with: ceph osd pool create {options.Image.Pool} && rbd pool init {options.Image.Pool})"
                    : $"cannot open pool '{options.Image.Pool}' as {entity}: {RbdErrors.Describe(-result)}",
                -result);
        }

        LibRados.IoCtxSetNamespace(ioctx, options.Image.Namespace.Length == 0 ? null : options.Image.Namespace);
        return new RbdConnection(cluster, ioctx);
    }

    public void Dispose()
    {
        if (_ioctx != 0)
        {
            LibRados.IoCtxDestroy(_ioctx);
            _ioctx = 0;
        }

        if (_cluster != 0)
        {
            LibRados.Shutdown(_cluster);
            _cluster = 0;
        }
    }

    /// <summary>Fails with a clear message, not a DllNotFoundException at the first request, when Ceph's client libraries are missing.</summary>
    private static void EnsureLibraries()
    {
        foreach (var (library, package) in new[] { (LibRados.Library, "librados2"), (LibRbd.Library, "librbd1") })
        {
            if (!NativeLibrary.TryLoad(library, typeof(RbdConnection).Assembly, null, out _))
            {
                throw new RbdOpenException($"{library} could not be loaded: install Ceph's client library (Debian/Ubuntu: apt install {package})");
            }
        }
    }

    private static void Configure(nint cluster, RbdOptions options)
    {
        var result = LibRados.ConfReadFile(cluster, options.ConfigFile);
        if (result < 0 && (options.ConfigFile is not null || -result != Errno.ENOENT))
        {
            throw new RbdOpenException($"cannot read Ceph configuration '{options.ConfigFile ?? "(default search)"}': {RbdErrors.Describe(-result)}", -result);
        }

        // CEPH_ARGS, as every Ceph client honours it.
        _ = LibRados.ConfParseEnv(cluster, null);

        var settings = new List<(string Key, string Value)>();
        if (options.Keyring is { } keyring)
        {
            settings.Add(("keyring", keyring));
        }

        var seconds = Math.Max(1, (int)Math.Ceiling(options.ConnectTimeout.TotalSeconds)).ToString(CultureInfo.InvariantCulture);
        settings.Add(("client_mount_timeout", seconds));
        if (!options.CephOptions.ContainsKey("rados_mon_op_timeout"))
        {
            settings.Add(("rados_mon_op_timeout", seconds));
        }

        // NBD clients cache for themselves, and several servers on one image only see one disk if none of them
        // holds writes or stale reads in a private cache: librbd's cache is off unless asked for (docs/rbd.md).
        if (!options.CephOptions.ContainsKey("rbd_cache"))
        {
            settings.Add(("rbd_cache", "false"));
        }

        settings.AddRange(options.CephOptions.Select(pair => (pair.Key, pair.Value)));
        foreach (var (key, value) in settings)
        {
            result = LibRados.ConfSet(cluster, key, value);
            if (result < 0)
            {
                throw new RbdOpenException(
                    -result == Errno.ENOENT
                        ? $"'{key}' is not a Ceph option (RBD export keys are conf, id, keyring, cluster, connect_timeout, or Ceph options)"
                        : $"Ceph option {key}={value} was refused: {RbdErrors.Describe(-result)}",
                    -result);
            }
        }
    }

    private static RbdOpenException ConnectFailure(int errno, RbdOptions options, string entity)
    {
        var keyring = options.Keyring ?? "the keyring named in the Ceph configuration";
        var message = errno switch
        {
            Errno.EACCES or Errno.EPERM =>
                $"the cluster refused {entity}: the key in {keyring} is wrong or the user does not exist ({RbdErrors.Describe(errno)})",
            Errno.ETIMEDOUT =>
                $"no Ceph monitor answered within {options.ConnectTimeout.TotalSeconds:0.#} s (check mon_host in {options.ConfigFile ?? "the Ceph configuration"} and that the monitors are up)",
            Errno.ENOENT =>
                $"cannot connect as {entity}: no monitor address or no key found (give conf=/path/to/ceph.conf, or mon_host=..., and keyring=...; {RbdErrors.Describe(errno)})",
            _ => $"connecting to the Ceph cluster as {entity} failed: {RbdErrors.Describe(errno)}",
        };
        return new RbdOpenException(message, errno);
    }
}
