using Spindle.Client;
using Xunit;

namespace Spindle.Fuzz.Tests;

/// <summary>
/// Bugs the NbdUris fuzz target found in <see cref="NbdUri"/> (inputs in Regressions/NbdUris): parsing threw an
/// ArgumentOutOfRangeException instead of a FormatException, and printing did not escape what parsing had decoded,
/// so the canonical text named another URI or none.
/// </summary>
public sealed class NbdUriRegressionTests
{
    [Fact]
    public void An_empty_socket_parameter_is_a_format_error_not_an_index_exception()
    {
        Assert.False(NbdUri.TryParse("nbd+unix:///disk?socket=", out _, out var error));
        Assert.Contains("socket", error, StringComparison.Ordinal);
        Assert.Throws<FormatException>(() => NbdUri.Parse("nbd+unix:///disk?socket="));
    }

    [Theory]
    [InlineData("nbd://a%20b:10810/disk", "a b", "nbd://a%20b:10810/disk")]
    [InlineData("nbd://user%40host/", "user@host", "nbd://user%40host/")]
    [InlineData("nbd://a%3Ab/", "a:b", "nbd://a%3Ab/")]
    [InlineData("nbd://a%0Ab/", "a\nb", "nbd://a%0Ab/")]
    [InlineData("nbd://[fe80::1%25eth0]:10810/", "fe80::1%eth0", "nbd://[fe80::1%25eth0]:10810/")]
    public void A_host_decoded_from_percent_escapes_prints_escaped_and_parses_back(string text, string host, string printed)
    {
        var uri = NbdUri.Parse(text);
        Assert.Equal(host, uri.Host);
        Assert.Equal(printed, uri.ToString());
        var again = NbdUri.Parse(uri.ToString());
        Assert.Equal(uri.Host, again.Host);
        Assert.Null(again.User);
    }

    [Fact]
    public void An_experimental_parameter_name_with_escapes_prints_escaped_and_parses_back()
    {
        var uri = NbdUri.Parse("nbd://h/?x-a%20b=%26");
        Assert.Equal("&", uri.ExperimentalParameters["x-a b"]);
        Assert.Equal("nbd://h/?x-a%20b=%26", uri.ToString());
        Assert.Equal("&", NbdUri.Parse(uri.ToString()).ExperimentalParameters["x-a b"]);
    }
}
