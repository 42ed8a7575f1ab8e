using System.Net;
using System.Net.Sockets;
using Spindle.Storage.Rbd;
using Spindle.Testing;
using Xunit;

namespace Spindle.Rbd.Tests;

/// <summary>Every way an open can fail gives a clear error, quickly, and never hangs or crashes.</summary>
public sealed class RbdOpenErrorTests(CephCluster cluster)
{
    [Fact(Timeout = 60_000)]
    public void A_missing_image_is_named()
    {
        var failure = Assert.Throws<RbdOpenException>(() => cluster.Open("rbd/no-such-image"));
        Assert.Contains("image rbd/no-such-image does not exist", failure.Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = 60_000)]
    public void A_missing_pool_is_named()
    {
        var failure = Assert.Throws<RbdOpenException>(() => cluster.Open("nopool/image"));
        Assert.Contains("pool 'nopool' does not exist", failure.Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = 60_000)]
    public async Task A_missing_snapshot_is_told_apart_from_a_missing_image()
    {
        var image = await cluster.CreateImageAsync("nosnap");
        var failure = Assert.Throws<RbdOpenException>(() => cluster.Open(image + "@never"));
        Assert.Contains("has no snapshot named 'never'", failure.Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = 60_000)]
    public async Task A_wrong_key_is_refused_with_a_message_that_says_so()
    {
        var image = await cluster.CreateImageAsync("wrongkey");
        using var directory = new TempDirectory();
        var keyring = directory.File("wrong.keyring");
        var key = await PeerTool.RunCheckedAsync("ceph-authtool", ["--gen-print-key"]);
        await File.WriteAllTextAsync(keyring, $"[client.admin]\n\tkey = {key.StandardOutput.Trim()}\n", TestContext.Current.CancellationToken);

        var options = cluster.Options(image);
        options.Keyring = keyring;
        var failure = Assert.Throws<RbdOpenException>(() => RbdBlockDevice.Open(options));
        Assert.Contains("the cluster refused client.admin", failure.Message, StringComparison.Ordinal);
        Assert.Contains("key", failure.Message, StringComparison.Ordinal);
        Assert.Equal(13, failure.Errno); // EACCES
    }

    [Fact(Timeout = 60_000)]
    public async Task An_unknown_user_is_refused()
    {
        var image = await cluster.CreateImageAsync("nouser");
        var options = cluster.Options(image);
        options.ClientId = "nobody";
        var failure = Assert.Throws<RbdOpenException>(() => RbdBlockDevice.Open(options));
        Assert.Contains("refused client.nobody", failure.Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = 60_000)]
    public void An_unreachable_monitor_times_out_instead_of_hanging()
    {
        // A loopback port nobody listens on: the monitor never answers.
        int port;
        using (var listener = new TcpListener(IPAddress.Loopback, 0))
        {
            listener.Start();
            port = ((IPEndPoint)listener.LocalEndpoint).Port;
        }

        var options = cluster.Options("rbd/whatever");
        options.CephOptions["mon_host"] = $"127.0.0.1:{port}";
        options.ConnectTimeout = TimeSpan.FromSeconds(2);
        var failure = Assert.Throws<RbdOpenException>(() => RbdBlockDevice.Open(options));
        Assert.Contains("no Ceph monitor answered within 2 s", failure.Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = 60_000)]
    public void A_missing_configuration_file_or_keyring_is_named_before_connecting()
    {
        var options = cluster.Options("rbd/whatever");
        options.ConfigFile = "/nonexistent/ceph.conf";
        Assert.Contains("'/nonexistent/ceph.conf' does not exist", Assert.Throws<RbdOpenException>(() => RbdBlockDevice.Open(options)).Message, StringComparison.Ordinal);

        options = cluster.Options("rbd/whatever");
        options.Keyring = "/nonexistent/keyring";
        Assert.Contains("keyring '/nonexistent/keyring' does not exist", Assert.Throws<RbdOpenException>(() => RbdBlockDevice.Open(options)).Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = 60_000)]
    public void A_misspelt_Ceph_option_is_refused_not_ignored()
    {
        var options = cluster.Options("rbd/whatever");
        options.CephOptions["rbd_cahce"] = "true";
        var failure = Assert.Throws<RbdOpenException>(() => RbdBlockDevice.Open(options));
        Assert.Contains("'rbd_cahce' is not a Ceph option", failure.Message, StringComparison.Ordinal);
    }
}
