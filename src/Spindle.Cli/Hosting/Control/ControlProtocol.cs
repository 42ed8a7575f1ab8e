using System.Text;
using System.Text.Json;

namespace Spindle.Cli.Hosting.Control;

/// <summary>A parsed control request.</summary>
internal sealed record ControlRequest(string Command, string? Name, long? Id, IReadOnlyList<KeyValuePair<string, string>> Settings);

/// <summary>
/// The control socket's messages, one JSON object per line each way. Requests:
/// <c>{"command":"status"|"exports"|"connections"|"reload"}</c>,
/// <c>{"command":"add"|"change","name":"disk","settings":{"exportname":"/srv/disk.img","readonly":"true"}}</c>
/// (the configuration file's export keys), <c>{"command":"remove","name":"disk"}</c>,
/// <c>{"command":"disconnect","id":7}</c>. Answers: <c>{"ok":true,...}</c> with the data or a message, or
/// <c>{"ok":false,"error":"..."}</c>. Written and read with Utf8JsonWriter and JsonDocument (no reflection: the
/// native executable has none to spare).
/// </summary>
internal static class ControlProtocol
{
    public static ControlRequest ParseRequest(string line)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(line);
        }
        catch (JsonException exception)
        {
            throw new FormatException($"the request is not JSON: {exception.Message}", exception);
        }

        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("command", out var command) || command.ValueKind != JsonValueKind.String)
            {
                throw new FormatException("the request must be an object with a \"command\" string");
            }

            var name = root.TryGetProperty("name", out var nameElement) && nameElement.ValueKind == JsonValueKind.String ? nameElement.GetString() : null;
            long? id = root.TryGetProperty("id", out var idElement) && idElement.ValueKind == JsonValueKind.Number && idElement.TryGetInt64(out var number) ? number : null;
            var settings = new List<KeyValuePair<string, string>>();
            if (root.TryGetProperty("settings", out var settingsElement) && settingsElement.ValueKind == JsonValueKind.Object)
            {
                foreach (var property in settingsElement.EnumerateObject())
                {
                    settings.Add(new KeyValuePair<string, string>(property.Name, property.Value.ValueKind == JsonValueKind.String ? property.Value.GetString()! : property.Value.GetRawText()));
                }
            }

            var verb = command.GetString()!;
            if (verb is "add" or "change" or "remove" && name is null)
            {
                throw new FormatException($"{verb} needs \"name\"");
            }

            if (verb == "disconnect" && id is null)
            {
                throw new FormatException("disconnect needs \"id\" (a connection number from connections)");
            }

            return new ControlRequest(verb, name, id, settings);
        }
    }

    public static string Request(string command, string? name = null, long? id = null, IEnumerable<KeyValuePair<string, string>>? settings = null) => Write(json =>
    {
        json.WriteString("command", command);
        if (name is not null)
        {
            json.WriteString("name", name);
        }

        if (id is not null)
        {
            json.WriteNumber("id", id.Value);
        }

        if (settings is not null)
        {
            json.WriteStartObject("settings");
            foreach (var (key, value) in settings)
            {
                json.WriteString(key, value);
            }

            json.WriteEndObject();
        }
    });

    public static string Answer(Action<Utf8JsonWriter> body) => Write(json =>
    {
        json.WriteBoolean("ok", true);
        body(json);
    });

    public static string From(ServerHost.ChangeResult result) => result.Ok
        ? Write(json =>
        {
            json.WriteBoolean("ok", true);
            json.WriteString("message", result.Message);
        })
        : Error(result.Message);

    public static string Error(string message) => Write(json =>
    {
        json.WriteBoolean("ok", false);
        json.WriteString("error", message);
    });

    private static string Write(Action<Utf8JsonWriter> body)
    {
        using var stream = new MemoryStream();
        using (var json = new Utf8JsonWriter(stream))
        {
            json.WriteStartObject();
            body(json);
            json.WriteEndObject();
        }

        return Encoding.UTF8.GetString(stream.ToArray());
    }
}
