using Spindle.Cli.Hosting;
using Xunit;

namespace Spindle.Server.Tests.Layers;

/// <summary>The persistent overlay's configuration key (<c>overlay = PATH</c>): read, part of the fingerprint, a layer.</summary>
public sealed class OverlaySettingsTests
{
    [Fact]
    public void The_overlay_key_is_read_and_makes_the_export_layered()
    {
        var configuration = IniConfigurationReader.Parse("[d]\nexportname = /srv/base.img\noverlay = /srv/d.qcow2\n[e]\nexportname = /srv/base.img\n");
        var layered = configuration.Exports[0].Layers;
        var plain = configuration.Exports[1].Layers;
        Assert.Equal("/srv/d.qcow2", layered.Overlay);
        Assert.False(layered.IsEmpty);
        Assert.True(plain.IsEmpty);

        // A reload that changes only the overlay path reopens the export's device.
        Assert.NotEqual(plain.Fingerprint, layered.Fingerprint);
        var moved = IniConfigurationReader.Parse("[d]\nexportname = /srv/base.img\noverlay = /srv/other.qcow2\n").Exports[0].Layers;
        Assert.NotEqual(layered.Fingerprint, moved.Fingerprint);
    }

    [Fact]
    public void A_directory_export_refuses_an_overlay()
    {
        var exception = Assert.Throws<ConfigurationException>(() => IniConfigurationReader.Parse("[d]\nbackend = directory\npath = /srv\noverlay = /srv/x.qcow2\n"));
        Assert.False(string.IsNullOrEmpty(exception.Message));
    }
}
