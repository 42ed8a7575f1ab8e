using Spindle.Cli.Commands;
using Spindle.Cli.Hosting;
using Spindle.Storage.Rbd;
using Xunit;

namespace Spindle.Rbd.Tests;

/// <summary>How users name an RBD image: image specifications, qemu-style options, configuration files, the command line.</summary>
public sealed class RbdConfigurationTests
{
    [Theory]
    [InlineData("rbd/vm1", "rbd", "", "vm1", null)]
    [InlineData("vm1", "rbd", "", "vm1", null)]
    [InlineData("pool/ns/vm1", "pool", "ns", "vm1", null)]
    [InlineData("pool/vm1@gold", "pool", "", "vm1", "gold")]
    [InlineData("pool/ns/vm1@gold", "pool", "ns", "vm1", "gold")]
    public void Image_specifications_follow_the_rbd_command(string text, string pool, string nameSpace, string image, string? snapshot)
    {
        var spec = RbdImageSpec.Parse(text);
        Assert.Equal(new RbdImageSpec(pool, nameSpace, image, snapshot), spec);
        Assert.Equal(snapshot is not null, spec.IsSnapshot);
        Assert.Equal(text.Contains('/', StringComparison.Ordinal) ? text : "rbd/" + text, spec.ToString());
    }

    [Theory]
    [InlineData("")]
    [InlineData("/vm1")]
    [InlineData("rbd/")]
    [InlineData("a/b/c/d")]
    [InlineData("rbd//vm1")]
    [InlineData("rbd/vm1@")]
    [InlineData("rbd/vm1@a@b")]
    public void Malformed_image_specifications_are_refused(string text) =>
        Assert.Throws<FormatException>(() => RbdImageSpec.Parse(text));

    [Fact]
    public void Qemu_style_options_follow_the_image_and_a_backslash_escapes_a_colon()
    {
        var options = RbdOptions.Create(@"rbd/vm1@s:conf=/etc/ceph/c.conf:id=client.alice:keyring=/k:mon_host=127.0.0.1\:6789:connect_timeout=2.5", [], readOnly: false);

        Assert.Equal(new RbdImageSpec("rbd", "", "vm1", "s"), options.Image);
        Assert.Equal("/etc/ceph/c.conf", options.ConfigFile);
        Assert.Equal("alice", options.ClientId);
        Assert.Equal("/k", options.Keyring);
        Assert.Equal(TimeSpan.FromSeconds(2.5), options.ConnectTimeout);
        Assert.Equal("127.0.0.1:6789", options.CephOptions["mon_host"]);
    }

    [Fact]
    public void Settings_override_inline_options_and_unknown_keys_become_Ceph_options()
    {
        var options = RbdOptions.Create("rbd/vm1:id=bob", [new("id", "carol"), new("rbd_cache", "true")], readOnly: true);

        Assert.Equal("carol", options.ClientId);
        Assert.True(options.ReadOnly);
        Assert.Equal("true", options.CephOptions["rbd_cache"]);
        Assert.Null(options.ConfigFile);
        Assert.Equal(RbdOptions.DefaultConnectTimeout, options.ConnectTimeout);
    }

    [Theory]
    [InlineData("rbd/vm1:noequals")]
    [InlineData("rbd/vm1:connect_timeout=soon")]
    [InlineData("rbd/vm1:connect_timeout=0")]
    [InlineData("rbd/vm1:id=")]
    public void Malformed_options_are_refused(string text) =>
        Assert.Throws<FormatException>(() => RbdOptions.Create(text, [], readOnly: false));

    [Fact]
    public void A_configuration_file_export_names_its_image_with_rbd_prefix_and_takes_keys_in_any_order()
    {
        var configuration = IniConfigurationReader.Parse("""
            [generic]
            [vm1]
                conf = /etc/ceph/ceph.conf
                id = spindle
                exportname = rbd:rbd/vm1
                keyring = /etc/ceph/ceph.client.spindle.keyring
                rbd_cache = true
            [gold]
                exportname = rbd:rbd/vm1@gold
            [explicit]
                backend = rbd
                exportname = pool/ns/vm2
            """);

        var vm1 = configuration.Exports[0];
        Assert.Equal("rbd", vm1.Backend);
        Assert.Equal("rbd/vm1", vm1.Location);
        Assert.Equal("/etc/ceph/ceph.conf", vm1.Settings["conf"]);
        Assert.Equal("spindle", vm1.Settings["id"]);
        Assert.Equal("/etc/ceph/ceph.client.spindle.keyring", vm1.Settings["keyring"]);
        Assert.Equal("true", vm1.Settings["rbd_cache"]);
        Assert.Equal(("rbd", "rbd/vm1@gold"), (configuration.Exports[1].Backend, configuration.Exports[1].Location));
        Assert.Equal(("rbd", "pool/ns/vm2"), (configuration.Exports[2].Backend, configuration.Exports[2].Location));
    }

    [Fact]
    public void A_file_export_still_refuses_unknown_keys_with_their_line()
    {
        var failure = Assert.Throws<ConfigurationException>(() => IniConfigurationReader.Parse("""
            [generic]
            [disk]
                keyring = /etc/ceph/keyring
                exportname = /srv/disk.img
            """, "test.conf"));
        Assert.Contains("test.conf:3: unknown export key 'keyring'", failure.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void An_rbd_export_without_an_image_is_refused()
    {
        var failure = Assert.Throws<ConfigurationException>(() => IniConfigurationReader.Parse("""
            [generic]
            [vm]
                backend = rbd
                conf = /etc/ceph/ceph.conf
            """));
        Assert.Contains("needs 'exportname = rbd:pool/image'", failure.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void The_command_line_serves_rbd_images_with_the_rbd_options_as_settings()
    {
        var settings = new Dictionary<string, string> { ["conf"] = "/c.conf", ["keyring"] = "/k" };
        var configuration = ServeCommand.BuildConfiguration("rbd:rbd/vm1@s", null, null, null, "vm", null, readOnly: false, settings);

        var export = Assert.Single(configuration.Exports);
        Assert.Equal("rbd", export.Backend);
        Assert.Equal("rbd/vm1@s", export.Location);
        Assert.Equal("vm", export.Options.Name);
        Assert.Equal("/c.conf", export.Settings["conf"]);
        Assert.Equal("/k", export.Settings["keyring"]);
    }

    [Fact]
    public void Rbd_options_without_an_rbd_image_and_create_with_one_are_refused()
    {
        var settings = new Dictionary<string, string> { ["conf"] = "/c.conf" };
        Assert.Contains("apply to an rbd:pool/image argument",
            Assert.Throws<ConfigurationException>(() => ServeCommand.BuildConfiguration("disk.img", null, null, null, "", null, false, settings)).Message, StringComparison.Ordinal);
        Assert.Contains("rbd create",
            Assert.Throws<ConfigurationException>(() => ServeCommand.BuildConfiguration("rbd:rbd/vm1", null, null, "1G", "", null, false)).Message, StringComparison.Ordinal);
    }
}
