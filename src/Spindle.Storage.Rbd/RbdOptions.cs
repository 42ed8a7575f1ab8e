using System.Globalization;
using Microsoft.Extensions.Logging;

namespace Spindle.Storage.Rbd;

/// <summary>How to reach an RBD image: the cluster (configuration, identity, key) and the image itself.</summary>
public sealed class RbdOptions
{
    /// <summary>The default for <see cref="ConnectTimeout"/>.</summary>
    public static readonly TimeSpan DefaultConnectTimeout = TimeSpan.FromSeconds(15);

    /// <summary>
    /// The default for <see cref="SizeCheckInterval"/>: 30 s. The header watch normally reports a resize within
    /// milliseconds; the timer only catches what the watch may miss (a notification lost while the cluster connection
    /// was down), so a resize is seen within half a minute at worst, and a re-read costs next to nothing (librbd answers
    /// from memory unless its header is out of date).
    /// </summary>
    public static readonly TimeSpan DefaultSizeCheckInterval = TimeSpan.FromSeconds(30);

    public RbdOptions(RbdImageSpec image)
    {
        ArgumentNullException.ThrowIfNull(image);
        Image = image;
    }

    /// <summary>The image (and snapshot) to open.</summary>
    public RbdImageSpec Image { get; set; }

    /// <summary>
    /// The ceph.conf to read. Null: Ceph's own search ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config,
    /// ./ceph.conf), and no file at all is fine when <c>mon_host</c> is given in <see cref="CephOptions"/>.
    /// </summary>
    public string? ConfigFile { get; set; }

    /// <summary>The cephx user without the <c>client.</c> prefix. Default: <c>admin</c>, as for the ceph tools.</summary>
    public string ClientId { get; set; } = "admin";

    /// <summary>The keyring holding the user's key. Null: the ceph.conf's <c>keyring</c> or Ceph's default paths.</summary>
    public string? Keyring { get; set; }

    /// <summary>The cluster name (selects /etc/ceph/NAME.conf in Ceph's search). Default: <c>ceph</c>.</summary>
    public string ClusterName { get; set; } = "ceph";

    /// <summary>Open the image read-only (no header watch, no lock). Snapshots are always read-only.</summary>
    public bool ReadOnly { get; set; }

    /// <summary>
    /// How long connecting to the monitors and opening the image may take before failing. Default: 15 s. Applied
    /// as Ceph's <c>client_mount_timeout</c> and as a bound on the open itself.
    /// </summary>
    public TimeSpan ConnectTimeout { get; set; } = DefaultConnectTimeout;

    /// <summary>
    /// How often the image's size is re-read, beside the header watch (rbd_update_watch) that reports a resize at once.
    /// Default: <see cref="DefaultSizeCheckInterval"/>. <see cref="TimeSpan.Zero"/>: never (the watch alone). A snapshot's
    /// size never changes, and a read-only open has no header watch in librbd (so a re-read would only repeat the
    /// size read at the open): neither is watched nor re-read. Setting key: <c>size_check_interval</c>
    /// (seconds).
    /// </summary>
    public TimeSpan SizeCheckInterval { get; set; } = DefaultSizeCheckInterval;

    /// <summary>
    /// Register rbd_update_watch (default: true). Off only in tests, to show that the timer alone finds a resize.
    /// </summary>
    internal bool WatchHeader { get; set; } = true;

    /// <summary>Where a change of the image's size (or a failure to read it) is logged. Null: nowhere.</summary>
    public ILogger? Logger { get; set; }

    /// <summary>
    /// Ceph configuration options set after the configuration file is read (for example <c>mon_host</c>,
    /// <c>rbd_cache</c>). Ceph validates the names: an unknown one fails the open.
    /// </summary>
    /// <remarks>Spindle sets <c>rbd_cache = false</c> unless it is given here; see docs/rbd.md.</remarks>
    public Dictionary<string, string> CephOptions { get; } = new(StringComparer.Ordinal);

    /// <summary>
    /// Builds options from an image specification (qemu's <c>pool/image[@snap][:key=value...]</c> form is accepted)
    /// and settings such as a configuration file or command line give them. Keys <c>conf</c>, <c>id</c>,
    /// <c>keyring</c>, <c>cluster</c>, <c>connect_timeout</c> and <c>size_check_interval</c> (seconds) are Spindle's; any other key is a Ceph
    /// option. Settings override options written inline.
    /// </summary>
    /// <exception cref="FormatException">The specification or a setting is malformed.</exception>
    public static RbdOptions Create(string location, IEnumerable<KeyValuePair<string, string>> settings, bool readOnly)
    {
        ArgumentNullException.ThrowIfNull(settings);
        var (image, inline) = RbdImageSpec.ParseWithOptions(location);
        var options = new RbdOptions(image) { ReadOnly = readOnly };
        foreach (var (key, value) in inline.Concat(settings))
        {
            options.Set(key, value);
        }

        return options;
    }

    /// <summary>Applies one <c>key=value</c> setting (see <see cref="Create"/>).</summary>
    /// <exception cref="FormatException">The value is not valid for the key.</exception>
    public void Set(string key, string value)
    {
        ArgumentException.ThrowIfNullOrEmpty(key);
        ArgumentNullException.ThrowIfNull(value);
        switch (key.ToLowerInvariant())
        {
            case "conf":
                ConfigFile = value;
                break;
            case "id":
                ClientId = value.StartsWith("client.", StringComparison.Ordinal) ? value["client.".Length..] : value;
                if (ClientId.Length == 0)
                {
                    throw new FormatException("id must name a cephx user (for example admin)");
                }

                break;
            case "keyring":
                Keyring = value;
                break;
            case "cluster":
                ClusterName = value;
                break;
            case "connect_timeout":
                if (!double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var seconds) || seconds is <= 0 or > 3600)
                {
                    throw new FormatException($"connect_timeout must be a number of seconds from 0 to 3600, not '{value}'");
                }

                ConnectTimeout = TimeSpan.FromSeconds(seconds);
                break;
            case "size_check_interval":
                if (!double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var interval) || interval is < 0 or > 86400)
                {
                    throw new FormatException($"size_check_interval must be a number of seconds from 0 (never) to 86400, not '{value}'");
                }

                SizeCheckInterval = TimeSpan.FromSeconds(interval);
                break;
            default:
                CephOptions[key] = value;
                break;
        }
    }
}
