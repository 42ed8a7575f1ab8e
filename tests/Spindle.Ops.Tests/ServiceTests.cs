using Spindle.Client;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>Privilege drop (nbd-server's user and group), --pid-file, and the control socket with spindle ctl.</summary>
public sealed class ServiceTests
{
    [Fact]
    public async Task User_and_group_are_dropped_to_after_binding_and_opening_on_every_thread()
    {
        using var directory = new TempDirectory();
        await using var server = await OpsServer.StartAsync("[disk]\n    exportname = $DIR/disk.img\n    filesize = 4M\n",
            generic: "    user = nobody\n    group = nogroup\n", directory: directory, extra: ["--pid-file", directory.File("spindle.pid")]);
        await server.WaitForLogAsync("Dropped privileges: now running as nobody", TimeSpan.FromSeconds(10));

        // Every thread: uid and gid are nobody/nogroup (real, effective, saved, filesystem) and no group is left.
        var nobody = (await PeerTool.RunCheckedAsync("id", ["-u", "nobody"])).StandardOutput.Trim();
        var nogroup = (await PeerTool.RunCheckedAsync("getent", ["group", "nogroup"])).StandardOutput.Split(':')[2];
        var tasks = Directory.GetDirectories($"/proc/{server.Process.Id}/task");
        Assert.True(tasks.Length > 1);
        foreach (var task in tasks)
        {
            var status = await File.ReadAllLinesAsync(Path.Combine(task, "status"), TestContext.Current.CancellationToken);
            Assert.Equal($"Uid:\t{nobody}\t{nobody}\t{nobody}\t{nobody}", status.Single(l => l.StartsWith("Uid:", StringComparison.Ordinal)));
            Assert.Equal($"Gid:\t{nogroup}\t{nogroup}\t{nogroup}\t{nogroup}", status.Single(l => l.StartsWith("Gid:", StringComparison.Ordinal)));
            Assert.Equal("Groups:", status.Single(l => l.StartsWith("Groups:", StringComparison.Ordinal)).Trim());
        }

        // The export opened as root keeps working, and the pid file names the server.
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-c", "write -P 3 0 64k", "-c", "read -P 3 0 64k", server.Uri("disk")]);
        Assert.Equal(server.Process.Id.ToString(System.Globalization.CultureInfo.InvariantCulture), (await File.ReadAllTextAsync(directory.File("spindle.pid"), TestContext.Current.CancellationToken)).Trim());

        // The control socket was handed to the service user, who may use it.
        var owner = (await PeerTool.RunCheckedAsync("stat", ["-c", "%U %a", server.ControlSocket])).StandardOutput.Trim();
        Assert.Equal("nobody 600", owner);
        Assert.Equal(0, await server.StopAsync());
    }

    [Fact]
    public async Task A_user_that_does_not_exist_refuses_to_start_and_a_pid_file_goes_away_at_exit()
    {
        using var directory = new TempDirectory();
        var port = OpsServer.FreePort();
        await File.WriteAllTextAsync(directory.File("bad.conf"), OpsServer.Config(port, "[d]\n    backend = memory\n    size = 1M\n", "    user = no-such-user-here\n"), TestContext.Current.CancellationToken);
        var refused = await PeerTool.RunAsync(SpindleExecutable.Path, ["serve", "--config", directory.File("bad.conf")], TimeSpan.FromSeconds(30));
        Assert.Equal(2, refused.ExitCode);
        Assert.Contains($"{directory.File("bad.conf")}:4: user 'no-such-user-here' does not exist", refused.StandardError, StringComparison.Ordinal);

        await using var server = await OpsServer.StartAsync("[d]\n    backend = memory\n    size = 1M\n", control: false, extra: ["--pid-file", directory.File("run.pid")]);
        Assert.True(File.Exists(directory.File("run.pid")));
        Assert.Equal(0, await server.StopAsync());
        Assert.False(File.Exists(directory.File("run.pid")));
    }

    [Fact]
    public async Task Ctl_lists_adds_changes_removes_and_disconnects_and_answers_only_root_or_the_service_user()
    {
        await using var server = await OpsServer.StartAsync("[disk]\n    exportname = $DIR/disk.img\n    filesize = 8M\n");
        await using var client = await NbdClient.ConnectAsync(server.Uri("disk"), cancellationToken: TestContext.Current.CancellationToken);
        await client.WriteAsync(0, new byte[65536], TestContext.Current.CancellationToken);

        using (var exports = await server.CtlJsonAsync("exports"))
        {
            var disk = Assert.Single(exports.RootElement.GetProperty("exports").EnumerateArray());
            Assert.Equal("disk", disk.GetProperty("name").GetString());
            Assert.Equal(1, disk.GetProperty("connections").GetInt32());
            Assert.Equal(65536, disk.GetProperty("bytes_written").GetInt64());
        }

        long id;
        using (var connections = await server.CtlJsonAsync("connections"))
        {
            var connection = Assert.Single(connections.RootElement.GetProperty("connections").EnumerateArray());
            Assert.Equal("disk", connection.GetProperty("export").GetString());
            Assert.StartsWith("127.0.0.1:", connection.GetProperty("peer").GetString(), StringComparison.Ordinal);
            Assert.False(connection.GetProperty("tls").GetBoolean());
            id = connection.GetProperty("id").GetInt64();
        }

        var text = await server.CtlAsync("connections");
        Assert.Contains("disk", text.StandardOutput, StringComparison.Ordinal);

        var add = await server.CtlAsync("add", "scratch", "backend=memory", "size=2M", "description=added live");
        Assert.True(add.ExitCode == 0, add.ToString());
        Assert.Equal("2097152", (await PeerTool.RunCheckedAsync("nbdinfo", ["--size", server.Uri("scratch")])).StandardOutput.Trim());
        var duplicate = await server.CtlAsync("add", "scratch", "backend=memory", "size=2M");
        Assert.Equal(1, duplicate.ExitCode);
        var bad = await server.CtlAsync("add", "broken", "backend=memory");
        Assert.Equal(1, bad.ExitCode);
        Assert.Contains("needs 'size = ...'", bad.StandardError, StringComparison.Ordinal);

        var change = await server.CtlAsync("change", "disk", "readonly=true");
        Assert.True(change.ExitCode == 0, change.ToString());
        Assert.Equal(0, (await PeerTool.RunAsync(SpindleExecutable.Path, ["info", "--is", "read-only", server.Uri("disk")])).ExitCode);

        // The client connected before the change keeps its read-write connection until it is disconnected; then it
        // reconnects by itself and gets the export as it is now.
        await client.WriteAsync(65536, new byte[4096], TestContext.Current.CancellationToken);
        var disconnect = await server.CtlAsync("disconnect", id.ToString(System.Globalization.CultureInfo.InvariantCulture));
        Assert.True(disconnect.ExitCode == 0, disconnect.ToString());
        await SystemdTests.WaitForAsync(() => client.Reconnections >= 1 || server.Count("closed (drained)") > 0 || client.ConnectionCount == 0, "the drained connection");

        var remove = await server.CtlAsync("remove", "scratch");
        Assert.True(remove.ExitCode == 0, remove.ToString());
        Assert.NotEqual(0, (await PeerTool.RunAsync("nbdinfo", ["--size", server.Uri("scratch")])).ExitCode);
        Assert.Equal(1, (await server.CtlAsync("remove", "scratch")).ExitCode);

        // The socket is 0600; opened up on purpose, it still answers only root and the server's own user (SO_PEERCRED).
        await PeerTool.RunCheckedAsync("chmod", ["0666", server.ControlSocket]);
        var stranger = await PeerTool.RunAsync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", SpindleExecutable.Path, "ctl", "--socket", server.ControlSocket, "status"]);
        Assert.True(stranger.ExitCode == 1 && stranger.StandardError.Contains("uid 65534 may not use this control socket", StringComparison.Ordinal), stranger.ToString());
    }
}
