using Xunit;

namespace Spindle.Client.Tests;

/// <summary>NBD URIs exactly as doc/uri.md defines them, including its export-name table.</summary>
public sealed class NbdUriTests
{
    [Theory]
    [InlineData("nbd://example.com/disk", "disk")]
    [InlineData("nbd+unix:///disk?socket=sock", "disk")]
    [InlineData("nbd://example.com/", "")]
    [InlineData("nbd://example.com", "")]
    [InlineData("nbd://example.com//disk", "/disk")]
    [InlineData("nbd://example.com/hello%20world", "hello world")]
    [InlineData("nbd://example.com/a/b/../c", "a/b/../c")]
    [InlineData("nbd://example.com/%2E%2E", "..")]
    [InlineData("nbd://example.com/caf%C3%A9", "café")]
    [InlineData("nbd://example.com/a+b", "a+b")]
    [InlineData("nbd://example.com/%23x%3Fy", "#x?y")]
    public void Export_name_is_the_path_without_its_leading_slash_percent_decoded(string text, string export)
    {
        Assert.Equal(export, NbdUri.Parse(text).ExportName);
    }

    [Fact]
    public void Tcp_uri_has_host_port_and_default_port()
    {
        var uri = NbdUri.Parse("nbd://example.com:1234/disk");
        Assert.Equal(NbdTransportKind.Tcp, uri.Transport);
        Assert.Equal("example.com", uri.Host);
        Assert.Equal(1234, uri.Port);
        Assert.False(uri.RequiresTls);
        Assert.Equal(10809, NbdUri.Parse("nbd://example.com/disk").Port);
        Assert.Equal(10809, NbdUri.Parse("nbd://example.com:/disk").Port);
    }

    [Theory]
    [InlineData("nbd://[::1]/disk", "::1", 10809)]
    [InlineData("nbd://[::1]:2000/disk", "::1", 2000)]
    [InlineData("nbd://[fe80::1%25eth0]:2000/", "fe80::1%eth0", 2000)]
    [InlineData("nbd://[2001:db8::42]", "2001:db8::42", 10809)]
    public void Ipv6_literals_go_in_brackets(string text, string host, int port)
    {
        var uri = NbdUri.Parse(text);
        Assert.Equal(host, uri.Host);
        Assert.Equal(port, uri.Port);
    }

    [Fact]
    public void Unix_uri_takes_its_socket_from_the_query()
    {
        var uri = NbdUri.Parse("nbd+unix:///export?socket=/run/nbd%20x.sock");
        Assert.Equal(NbdTransportKind.Unix, uri.Transport);
        Assert.Equal("/run/nbd x.sock", uri.SocketPath);
        Assert.Equal("export", uri.ExportName);
        Assert.Null(uri.Host);
        Assert.Equal("unix:/run/nbd x.sock", uri.Target);
    }

    [Fact]
    public void Abstract_socket_starts_with_nul()
    {
        var uri = NbdUri.Parse("nbd+unix:///?socket=%00/abstract");
        Assert.Equal("\0/abstract", uri.SocketPath);
        Assert.Equal("nbd+unix:///?socket=%00/abstract", uri.ToString());
    }

    [Theory]
    [InlineData("nbds://example.com/disk", NbdTransportKind.Tcp)]
    [InlineData("nbds+unix:///disk?socket=/tmp/s", NbdTransportKind.Unix)]
    [InlineData("NBDS://example.com/disk", NbdTransportKind.Tcp)]
    public void Tls_schemes_parse_and_require_tls(string text, NbdTransportKind transport)
    {
        var uri = NbdUri.Parse(text);
        Assert.True(uri.RequiresTls);
        Assert.Equal(transport, uri.Transport);
    }

    [Fact]
    public void Tls_parameters_and_user_are_kept()
    {
        var uri = NbdUri.Parse("nbds://alice@example.com/disk?tls-type=psk&tls-hostname=server.example&tls-verify-peer=0&x-custom=1");
        Assert.Equal("alice", uri.User);
        Assert.Equal("psk", uri.TlsType);
        Assert.Equal("server.example", uri.TlsHostname);
        Assert.False(uri.TlsVerifyPeer);
        Assert.Equal("1", uri.ExperimentalParameters["x-custom"]);
    }

    [Theory]
    [InlineData("", "empty")]
    [InlineData("disk.img", "no scheme")]
    [InlineData("http://example.com/disk", "unknown scheme 'http'")]
    [InlineData("nbd+vsock://2/disk", "not supported")]
    [InlineData("nbd:///disk", "no host")]
    [InlineData("nbd://example.com:99999/", "port '99999'")]
    [InlineData("nbd://example.com:12a/", "port '12a'")]
    [InlineData("nbd://::1/disk", "put it in brackets")]
    [InlineData("nbd://[::1/disk", "no ']'")]
    [InlineData("nbd://[nothost]/disk", "not an IPv6 address")]
    [InlineData("nbd://example.com/disk?socket=/tmp/s", "only for nbd+unix")]
    [InlineData("nbd+unix:///disk", "needs ?socket=PATH")]
    [InlineData("nbd+unix://host/disk?socket=/tmp/s", "has no host")]
    [InlineData("nbd://example.com/disk?bogus=1", "unknown query parameter 'bogus'")]
    [InlineData("nbd://example.com/disk?tls-verify-peer=maybe", "tls-verify-peer")]
    [InlineData("nbd://example.com/disk?tls-type=rot13", "tls-type")]
    [InlineData("nbd://example.com/d%zz", "two hex digits")]
    [InlineData("nbd://example.com/d%00", "NUL")]
    [InlineData("nbd://example.com/%ff", "UTF-8")]
    [InlineData("nbd://example.com/my disk", "space")]
    [InlineData("nbd://example.com/disk#frag", "fragment")]
    [InlineData("nbd://example.com/disk?socket=a&socket=b", "more than once")]
    [InlineData("nbd+unix:///?socket=/a%00b", "NUL only as its first character")]
    public void Invalid_uris_are_refused_with_the_reason(string text, string reason)
    {
        Assert.False(NbdUri.TryParse(text, out _, out var error));
        Assert.Contains(reason, error, StringComparison.Ordinal);
        var exception = Assert.Throws<FormatException>(() => NbdUri.Parse(text));
        Assert.Contains(reason, exception.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("nbd://example.com/disk")]
    [InlineData("nbd://example.com:1234/")]
    [InlineData("nbd://[::1]:2000/a%20b")]
    [InlineData("nbd://example.com//disk")]
    [InlineData("nbd+unix:///x?socket=/tmp/s.sock")]
    [InlineData("nbds://u@example.com/d?tls-type=x509&tls-verify-peer=1")]
    [InlineData("nbd://example.com/%23x%3Fy%25")]
    public void Formatting_gives_back_an_equivalent_uri(string text)
    {
        var uri = NbdUri.Parse(text);
        Assert.Equal(text, uri.ToString());
        Assert.Equal(uri.ExportName, NbdUri.Parse(uri.ToString()).ExportName);
    }

    [Fact]
    public void Export_names_with_every_special_character_round_trip()
    {
        var names = new[] { "", "/", "//x", "a b", "ü€𝄞", "?#%&=+", "..", "a/b/c" };
        foreach (var name in names)
        {
            var text = NbdUri.ForTcp("h", 5, name).ToString();
            Assert.Equal(name, NbdUri.Parse(text).ExportName);
        }
    }

    [Theory]
    [InlineData("nbd://h/x", true)]
    [InlineData("NBD+UNIX:///x?socket=s", true)]
    [InlineData("nbds://h", true)]
    [InlineData("disk.img", false)]
    [InlineData("/dev/sdb", false)]
    [InlineData("C:disk", false)]
    public void Uris_are_told_from_file_names(string text, bool isUri)
    {
        Assert.Equal(isUri, NbdUri.LooksLikeUri(text));
    }
}
