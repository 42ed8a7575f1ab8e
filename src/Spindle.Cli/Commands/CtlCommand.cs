using System.CommandLine;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using Spindle.Cli.Hosting;
using Spindle.Cli.Hosting.Control;

namespace Spindle.Cli.Commands;

/// <summary><c>spindle ctl</c>: talks to a running server's control socket.</summary>
internal static class CtlCommand
{
    /// <summary>Where the packaged spindle.service puts the control socket (RuntimeDirectory=spindle).</summary>
    internal const string DefaultSocket = "/run/spindle/control.sock";

    private const string Examples = """
        Control a running spindle serve through its control socket (--control PATH, or control_socket in the
        configuration; the packaged service uses /run/spindle/control.sock). Only root and the user the server
        runs as may use it.

        Examples:
          spindle ctl status                               the server's summary
          spindle ctl exports                              exports with their connections and totals
          spindle ctl connections                          clients: peer, TLS identity, export, age, rates
          spindle ctl add scratch backend=memory size=1G   a new export (the configuration file's keys)
          spindle ctl change disk readonly=true            new connections get the change
          spindle ctl remove disk                          clients finish in-flight requests, then get ESHUTDOWN
          spindle ctl disconnect 12                        the same for one connection
          spindle ctl reload                               re-read the configuration file (as SIGHUP does)

        Changes made with add, change and remove last until the next reload, which makes the file the truth again.
        """;

    public static Command Create()
    {
        var socket = new Option<string>("--socket", "-s")
        {
            Description = $"The server's control socket [default: {DefaultSocket}].",
            DefaultValueFactory = _ => DefaultSocket,
        };
        var json = new Option<bool>("--json") { Description = "Print the server's JSON answer as is." };
        var command = new Command("ctl", Examples);
        command.Options.Add(socket);
        command.Options.Add(json);

        Command Verb(string name, string description, Func<ParseResult, string> request, params Symbol[] symbols)
        {
            var verb = new Command(name, description);
            foreach (var symbol in symbols)
            {
                switch (symbol)
                {
                    case Argument argument:
                        verb.Arguments.Add(argument);
                        break;
                    case Option option:
                        verb.Options.Add(option);
                        break;
                }
            }

            verb.SetAction(async (parse, cancellationToken) =>
            {
                string text;
                try
                {
                    text = request(parse);
                }
                catch (FormatException exception)
                {
                    return CliErrors.Usage(exception.Message);
                }

                return await RunAsync(parse.GetValue(socket)!, name, text, parse.GetValue(json), cancellationToken).ConfigureAwait(false);
            });
            command.Subcommands.Add(verb);
            return verb;
        }

        var exportName = new Argument<string>("name") { Description = "The export's name." };
        var settings = new Argument<string[]>("settings") { Description = "KEY=VALUE: export keys of the configuration file (docs/configuration.md).", Arity = ArgumentArity.ZeroOrMore };
        var connectionId = new Argument<long>("id") { Description = "The connection's number (spindle ctl connections)." };
        Verb("status", "The server's summary: exports, connections, uptime.", _ => ControlProtocol.Request("status"));
        Verb("exports", "List the exports with their connections and totals.", _ => ControlProtocol.Request("exports"));
        Verb("connections", "List the connections: peer, TLS identity, export, age, rates.", _ => ControlProtocol.Request("connections"));
        Verb("reload", "Re-read the configuration file (as SIGHUP does).", _ => ControlProtocol.Request("reload"));
        Verb("add", "Add an export: spindle ctl add NAME exportname=/path [readonly=true ...].", p => ControlProtocol.Request("add", p.GetValue(exportName), settings: Pairs(p.GetValue(settings))), exportName, settings);
        Verb("change", "Change an export's keys for new connections (KEY= removes a key).", p => ControlProtocol.Request("change", p.GetValue(exportName), settings: Pairs(p.GetValue(settings))), exportName, settings);
        Verb("remove", "Remove an export: its clients finish what is in flight, then get ESHUTDOWN.", p => ControlProtocol.Request("remove", p.GetValue(exportName)), exportName);
        Verb("disconnect", "Disconnect a client: in-flight requests finish, then it gets ESHUTDOWN.", p => ControlProtocol.Request("disconnect", id: p.GetValue(connectionId)), connectionId);
        return command;
    }

    private static List<KeyValuePair<string, string>> Pairs(string[]? settings)
    {
        var pairs = new List<KeyValuePair<string, string>>();
        foreach (var setting in settings ?? [])
        {
            var equals = setting.IndexOf('=', StringComparison.Ordinal);
            if (equals <= 0)
            {
                throw new FormatException($"'{setting}' is not KEY=VALUE");
            }

            pairs.Add(new KeyValuePair<string, string>(setting[..equals].Trim(), setting[(equals + 1)..].Trim()));
        }

        return pairs;
    }

    private static async Task<int> RunAsync(string socketPath, string verb, string request, bool asJson, CancellationToken cancellationToken)
    {
        string answer;
        try
        {
            answer = await SendAsync(socketPath, request, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception exception) when (exception is SocketException or IOException)
        {
            return CliErrors.Fail($"cannot reach the control socket {socketPath}: {exception.Message} (is spindle serve running with --control {socketPath}?)");
        }

        using var document = JsonDocument.Parse(answer);
        var root = document.RootElement;
        var ok = root.TryGetProperty("ok", out var okElement) && okElement.GetBoolean();
        if (asJson)
        {
            Console.Out.WriteLine(answer);
        }
        else if (!ok)
        {
            return CliErrors.Fail(root.GetProperty("error").GetString() ?? "the server refused");
        }
        else
        {
            Console.Out.Write(Render(verb, root));
        }

        return ok ? 0 : CliErrors.Failure;
    }

    /// <summary>Sends one request line and reads the one answer line.</summary>
    internal static async Task<string> SendAsync(string socketPath, string request, CancellationToken cancellationToken)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), cancellationToken).ConfigureAwait(false);
        using var stream = new NetworkStream(socket, ownsSocket: false);
        await stream.WriteAsync(Encoding.UTF8.GetBytes(request + "\n"), cancellationToken).ConfigureAwait(false);
        using var reader = new StreamReader(stream, Encoding.UTF8);
        return await reader.ReadLineAsync(cancellationToken).ConfigureAwait(false) ?? throw new IOException("the server closed the control connection without answering");
    }

    private static string Render(string verb, JsonElement root)
    {
        var text = new StringBuilder();
        switch (verb)
        {
            case "status":
                foreach (var property in root.EnumerateObject().Where(p => p.Name != "ok"))
                {
                    text.Append(CultureInfo.InvariantCulture, $"{property.Name}: {property.Value}\n");
                }

                break;
            case "exports":
                text.Append(CultureInfo.InvariantCulture, $"{"NAME",-16} {"SIZE",12} {"MODE",-3} {"CONN",4} {"REQUESTS",10} {"READ",12} {"WRITTEN",12} {"ERRORS",6}  BACKEND\n");
                foreach (var export in root.GetProperty("exports").EnumerateArray())
                {
                    text.Append(CultureInfo.InvariantCulture,
                        $"{Name(export.GetProperty("name").GetString()!),-16} {export.GetProperty("size").GetInt64(),12} {(export.GetProperty("read_only").GetBoolean() ? "ro" : "rw"),-3} {export.GetProperty("connections").GetInt32(),4} {export.GetProperty("requests").GetInt64(),10} {export.GetProperty("bytes_read").GetInt64(),12} {export.GetProperty("bytes_written").GetInt64(),12} {export.GetProperty("errors").GetInt64(),6}  {export.GetProperty("backend").GetString()}\n");
                }

                break;
            case "connections":
                text.Append(CultureInfo.InvariantCulture, $"{"ID",5} {"PEER",-24} {"EXPORT",-16} {"TLS",-20} {"AGE",8} {"REQUESTS",10} {"READ/S",10} {"WRITE/S",10}\n");
                foreach (var connection in root.GetProperty("connections").EnumerateArray())
                {
                    var tls = connection.GetProperty("tls").GetBoolean() ? connection.TryGetProperty("tls_identity", out var identity) ? identity.GetString()! : "yes" : "no";
                    var export = connection.TryGetProperty("export", out var name) ? Name(name.GetString()!) : "(negotiating)";
                    text.Append(CultureInfo.InvariantCulture,
                        $"{connection.GetProperty("id").GetInt64(),5} {connection.GetProperty("peer").GetString(),-24} {export,-16} {tls,-20} {connection.GetProperty("age_seconds").GetDouble(),7:0}s {connection.GetProperty("requests").GetInt64(),10} {connection.GetProperty("read_rate").GetDouble(),10:0} {connection.GetProperty("write_rate").GetDouble(),10:0}{(connection.GetProperty("draining").GetBoolean() ? " draining" : "")}\n");
                }

                break;
            default:
                text.Append(root.GetProperty("message").GetString()).Append('\n');
                break;
        }

        return text.ToString();
    }

    private static string Name(string name) => name.Length == 0 ? "(default)" : name;
}
