using System.Globalization;
using Spindle.Client;
using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Rbd.Tests;

/// <summary>
/// RBD online resize: `rbd resize` on an image that is being served. The backend sees the new size (through the
/// header watch, or its timer), new NBD connections negotiate it, open ones keep theirs, and Spindle's client takes a
/// larger size when it reconnects. Every wait is a poll with a deadline; no timing is asserted.
/// </summary>
public sealed class RbdResizeTests(CephCluster cluster)
{
    private const long OldSize = CephCluster.DefaultImageSize;
    private const long NewSize = 96L << 20;
    private static readonly TimeSpan PeerTimeout = TimeSpan.FromSeconds(120);
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(60);

    /// <summary>So long that within a test only rbd_update_watch can explain a change of size.</summary>
    private static readonly TimeSpan NoTimer = TimeSpan.FromHours(1);

    private static CancellationToken Token => TestContext.Current.CancellationToken;

    [Fact(Timeout = 120_000)]
    public async Task A_grown_image_is_seen_through_the_header_watch_and_written_past_its_old_end()
    {
        var image = await cluster.CreateImageAsync("grow");
        var options = cluster.Options(image);
        options.SizeCheckInterval = NoTimer;
        await using var device = Spindle.Storage.Rbd.RbdBlockDevice.Open(options);
        Assert.Equal(OldSize, device.Size);

        await Resize(image, NewSize);
        await WaitAsync(() => device.Size == NewSize, $"the device still reports {device.Size} bytes");
        Assert.Equal(1, device.SizeChanges);

        var data = Patterns.Generate(OldSize + 4096, 65536, seed: 21);
        await device.WriteAsync(OldSize + 4096, data, fua: true, Token);
        var back = new byte[data.Length];
        await device.ReadAsync(OldSize + 4096, back, Token);
        Assert.Equal(data, back);
        Assert.Equal(data, await cluster.PythonReadAsync(image, OldSize + 4096, data.Length));
    }

    [Fact(Timeout = 120_000)]
    public async Task Without_the_header_watch_the_timer_alone_finds_a_grown_image()
    {
        var image = await cluster.CreateImageAsync("grow-timer");
        var options = cluster.Options(image);
        options.WatchHeader = false;
        options.SizeCheckInterval = TimeSpan.FromMilliseconds(200);
        await using var device = Spindle.Storage.Rbd.RbdBlockDevice.Open(options);

        await Resize(image, NewSize);
        await WaitAsync(() => device.Size == NewSize, $"the device still reports {device.Size} bytes");
        var data = Patterns.Generate(NewSize - 4096, 4096, seed: 12);
        await device.WriteAsync(NewSize - 4096, data, fua: true, Token);
        Assert.Equal(data, await cluster.PythonReadAsync(image, NewSize - 4096, data.Length));
    }

    [Fact(Timeout = 120_000)]
    public async Task A_read_only_open_keeps_the_size_it_was_opened_with_and_goes_on_serving_it()
    {
        // librbd gives a read-only open no header watch: it cannot follow a resize (docs/rbd.md says so).
        var image = await cluster.CreateImageAsync("grow-ro");
        await using var readOnly = cluster.Open(image, readOnly: true);
        var options = cluster.Options(image);
        options.SizeCheckInterval = NoTimer;
        await using var writable = Spindle.Storage.Rbd.RbdBlockDevice.Open(options);
        var data = Patterns.Generate(OldSize - 4096, 4096, seed: 11);
        await writable.WriteAsync(OldSize - 4096, data, fua: true, Token);

        await Resize(image, NewSize);
        await WaitAsync(() => writable.Size == NewSize, $"the writable open still reports {writable.Size} bytes");
        Assert.Equal(OldSize, readOnly.Size);
        Assert.Equal(0, readOnly.SizeChanges);
        var back = new byte[4096];
        await readOnly.ReadAsync(OldSize - 4096, back, Token);
        Assert.Equal(data, back);
    }

    [Fact(Timeout = 120_000)]
    public async Task A_shrunk_image_is_seen_and_a_read_past_its_new_end_fails_with_an_error()
    {
        var image = await cluster.CreateImageAsync("shrink");
        var options = cluster.Options(image);
        options.SizeCheckInterval = NoTimer;
        await using var device = Spindle.Storage.Rbd.RbdBlockDevice.Open(options);

        await cluster.RbdAsync("resize", "--allow-shrink", "--size", "32M", image);
        await WaitAsync(() => device.Size == 32L << 20, $"the device still reports {device.Size} bytes");
        var failure = await Assert.ThrowsAsync<BlockDeviceException>(() => device.ReadAsync(40L << 20, new byte[4096], Token).AsTask());
        Assert.NotEqual(NbdError.None, failure.Error);

        // The image is still served below its new end.
        var data = Patterns.Generate(0, 4096, seed: 2);
        await device.WriteAsync(0, data, fua: false, Token);
        var back = new byte[4096];
        await device.ReadAsync(0, back, Token);
        Assert.Equal(data, back);
    }

    [Fact(Timeout = 180_000)]
    public async Task Spindle_serve_new_connections_see_the_grown_size_and_an_open_one_keeps_its_own()
    {
        var image = await cluster.CreateImageAsync("serve-grow");
        using var directory = new TempDirectory();
        var socket = directory.File("nbd.sock");
        var uri = $"nbd+unix:///?socket={socket}";

        // size_check_interval=3600: the change can only come from rbd_update_watch.
        await using var server = await ServeRbdCommandTests.StartAsync(socket, $"rbd:{image}:size_check_interval=3600", "--rbd-conf", cluster.ConfigFile,
            "--rbd-keyring", cluster.Keyring, "--unix", socket);
        await using var old = await RawNbdClient.ConnectUnixAsync(socket);
        var (negotiated, _) = await old.NegotiateAsync();
        Assert.Equal((ulong)OldSize, negotiated);

        await Resize(image, NewSize);
        await WaitForAsync(async () => await NbdinfoSizeAsync(uri) == NewSize, "nbdinfo --size did not report the new size");
        Assert.Contains($"grew from {OldSize} to {NewSize} bytes (seen by the header watch)", server.Output, StringComparison.Ordinal);

        // A new connection writes past the old end; another reads it back; the cluster has it.
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", uri, "-c", $"write -P 0x5a {OldSize + (1 << 20)} 1M", "-c", "flush"], PeerTimeout);
        var verify = await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-r", uri, "-c", $"read -P 0x5a {OldSize + (1 << 20)} 1M"], PeerTimeout);
        Assert.DoesNotContain("fail", verify.StandardOutput, StringComparison.OrdinalIgnoreCase);
        var stored = await cluster.PythonReadAsync(image, OldSize + (1 << 20), 1 << 20);
        Assert.True(stored.AsSpan().IndexOfAnyExcept((byte)0x5a) < 0, "the cluster does not hold what qemu-io wrote past the old end");

        // The connection opened before the resize works within its own size and is refused past it, then goes on.
        await old.SendRequestAsync(NbdCommand.Read, 1, (ulong)OldSize - 4096, 4096);
        Assert.Equal(NbdError.None, (await old.ReadStructuredReplyAsync(1))[^1].AnyError);
        await old.SendRequestAsync(NbdCommand.Read, 2, (ulong)OldSize + (1 << 20), 4096);
        Assert.Equal(NbdError.InvalidArgument, (await old.ReadStructuredReplyAsync(2))[^1].AnyError);
        await old.SendRequestAsync(NbdCommand.Read, 3, 0, 4096);
        Assert.Equal(NbdError.None, (await old.ReadStructuredReplyAsync(3))[^1].AnyError);
    }

    [Fact(Timeout = 180_000)]
    public async Task Spindles_client_carries_on_across_a_server_restart_and_takes_the_larger_size()
    {
        var image = await cluster.CreateImageAsync("client-grow");
        using var directory = new TempDirectory();
        var socket = directory.File("nbd.sock");
        string[] arguments = [$"rbd:{image}", "--rbd-conf", cluster.ConfigFile, "--rbd-keyring", cluster.Keyring, "--unix", socket];
        var options = new NbdClientOptions
        {
            ReconnectDelay = TimeSpan.FromMilliseconds(50),
            MaxReconnectDelay = TimeSpan.FromMilliseconds(500),
            DeadConnectionTimeout = TimeSpan.FromSeconds(90),
        };

        var server = await ServeRbdCommandTests.StartAsync(socket, arguments);
        await using var client = await NbdClient.ConnectAsync($"nbd+unix:///?socket={socket}", options, Token);
        var grown = new TaskCompletionSource<ExportSizeChangedEventArgs>(TaskCreationOptions.RunContinuationsAsynchronously);
        client.SizeChanged += (_, change) => grown.TrySetResult(change);
        try
        {
            var data = Patterns.Generate(0, 65536, seed: 31);
            await client.WriteAsync(0, data, Token);
            await client.FlushAsync(Token);

            await Resize(image, NewSize);
            Assert.Equal(OldSize, client.Size);
            Assert.Equal(0, await server.StopAsync());
            await server.DisposeAsync();
            File.Delete(socket);
            server = await ServeRbdCommandTests.StartAsync(socket, arguments);

            // The next request waits for the reconnection, which brings the larger size.
            var back = new byte[data.Length];
            await client.ReadAsync(0, back, Token).AsTask().WaitAsync(Deadline, Token);
            Assert.Equal(data, back);
            var change = await grown.Task.WaitAsync(Deadline, Token);
            Assert.Equal(OldSize, change.OldSize);
            Assert.Equal(NewSize, change.NewSize);
            Assert.Equal(NewSize, client.Size);

            var tail = Patterns.Generate(NewSize - 65536, 65536, seed: 32);
            await client.WriteAsync(NewSize - 65536, tail, Token);
            await client.FlushAsync(Token);
            Assert.Equal(tail, await cluster.PythonReadAsync(image, NewSize - 65536, tail.Length));
        }
        finally
        {
            await server.DisposeAsync();
        }
    }

    private Task Resize(string image, long size) =>
        cluster.RbdAsync("resize", "--size", (size / 1024).ToString(CultureInfo.InvariantCulture) + "K", image);

    private static async Task<long> NbdinfoSizeAsync(string uri)
    {
        var result = await PeerTool.RunCheckedAsync("nbdinfo", ["--size", uri], PeerTimeout);
        return long.Parse(result.StandardOutput.Trim(), CultureInfo.InvariantCulture);
    }

    private static Task WaitAsync(Func<bool> condition, string failure) => WaitForAsync(() => Task.FromResult(condition()), failure);

    /// <summary>Polls <paramref name="condition"/> until it holds, for at most <see cref="Deadline"/>.</summary>
    private static async Task WaitForAsync(Func<Task<bool>> condition, string failure)
    {
        var deadline = DateTime.UtcNow + Deadline;
        for (var round = 0; !await condition(); round++)
        {
            Assert.True(DateTime.UtcNow < deadline && round < 10_000, failure);
            await Task.Delay(100, Token);
        }
    }
}
