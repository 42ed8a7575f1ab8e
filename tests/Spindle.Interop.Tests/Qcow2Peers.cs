using System.Globalization;
using System.Text.Json;
using Spindle.Testing;
using Xunit;

namespace Spindle.Interop.Tests;

/// <summary>qemu-img and qemu-io on qcow2 images and on what Spindle serves of them: the oracle of the qcow2 serving tests.</summary>
internal static class Qcow2Peers
{
    public static Task<ProcessResult> Img(params string[] arguments) => PeerTool.RunCheckedAsync("qemu-img", arguments, TimeSpan.FromSeconds(300));

    /// <summary>qemu-img create -f qcow2 -o OPTIONS (plus extra arguments such as -b BACKING -F FORMAT).</summary>
    public static Task<string> Create(TempDirectory directory, string name, string options, long size, params string[] extra) =>
        CreateAt(directory.File(name), options, size, extra);

    /// <summary>qemu-img create -f qcow2 -o OPTIONS at <paramref name="path"/>.</summary>
    public static async Task<string> CreateAt(string path, string options, long size, params string[] extra)
    {
        await Img(["create", "-q", "-f", "qcow2", "-o", options, .. extra, path, size.ToString(CultureInfo.InvariantCulture)]);
        return path;
    }

    /// <summary>Runs qemu-io commands on a file (FORMAT) or an NBD URI (raw), failing on any error it reports.</summary>
    public static Task<ProcessResult> Io(string target, string format, params string[] commands) => Io(target, format, readOnly: false, commands);

    /// <summary>qemu-io -r: reads only (the target may be read-only).</summary>
    public static Task<ProcessResult> Read(string target, string format, params string[] commands) => Io(target, format, readOnly: true, commands);

    private static async Task<ProcessResult> Io(string target, string format, bool readOnly, string[] commands)
    {
        var arguments = new List<string> { "-f", format };
        if (readOnly)
        {
            arguments.Add("-r");
        }

        foreach (var command in commands)
        {
            arguments.AddRange(["-c", command]);
        }

        arguments.Add(target);
        var result = await PeerTool.RunCheckedAsync("qemu-io", arguments, TimeSpan.FromSeconds(300));
        Assert.DoesNotContain("failed", result.StandardOutput + result.StandardError, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("Pattern verification", result.StandardOutput, StringComparison.Ordinal);
        return result;
    }

    /// <summary>qemu-img check --output=json: corruptions, leaks and check errors (exit 0: clean, 3: leaks only).</summary>
    public static async Task<Qcow2Check> Check(string image, bool repairLeaks = false)
    {
        var arguments = new List<string> { "check", "--output=json", "-f", "qcow2" };
        if (repairLeaks)
        {
            arguments.AddRange(["-r", "leaks"]);
        }

        arguments.Add(image);
        var result = await PeerTool.RunAsync("qemu-img", arguments, TimeSpan.FromSeconds(300));
        Assert.True(result.ExitCode is 0 or 3, $"qemu-img check found corruption or failed: {result}");
        using var json = JsonDocument.Parse(result.StandardOutput[result.StandardOutput.IndexOf('{', StringComparison.Ordinal)..]);
        var root = json.RootElement;
        int Read(string name) => root.TryGetProperty(name, out var value) ? value.GetInt32() : 0;
        return new Qcow2Check(result.ExitCode, Read("corruptions"), Read("leaks"), Read("check-errors"), result.ToString());
    }

    /// <summary>Asserts qemu-img check finds no corruption and no errors (leaks allowed unless <paramref name="allowLeaks"/> is false).</summary>
    public static async Task AssertClean(string image, bool allowLeaks = true)
    {
        var check = await Check(image);
        Assert.True(check.Corruptions == 0 && check.Errors == 0, $"qemu-img check: {check.Output}");
        Assert.True(allowLeaks || check.Leaks == 0, $"qemu-img check found leaks: {check.Output}");
    }

    /// <summary>qemu-img compare: true when the two read the same (a URI is read as raw).</summary>
    public static async Task<bool> Same(string first, string firstFormat, string second, string secondFormat)
    {
        var result = await PeerTool.RunAsync("qemu-img", ["compare", "-U", "-f", firstFormat, "-F", secondFormat, first, second], TimeSpan.FromSeconds(300));
        Assert.True(result.ExitCode is 0 or 1, $"qemu-img compare failed: {result}");
        return result.ExitCode == 0;
    }

    /// <summary>
    /// qemu-img map --output=json of a file (opened by qemu, -U) or of an NBD URI, reduced to what both can say: runs
    /// of (data, zero) with neighbours of equal status merged.
    /// </summary>
    public static async Task<List<(long Start, long Length, bool Data, bool Zero)>> Map(string target, string format)
    {
        var result = await Img("map", "--output=json", "-U", "-f", format, target);
        using var json = JsonDocument.Parse(result.StandardOutput);
        var runs = new List<(long Start, long Length, bool Data, bool Zero)>();
        foreach (var entry in json.RootElement.EnumerateArray())
        {
            var run = (Start: entry.GetProperty("start").GetInt64(), Length: entry.GetProperty("length").GetInt64(), Data: entry.GetProperty("data").GetBoolean(), Zero: entry.GetProperty("zero").GetBoolean());
            if (runs.Count > 0 && runs[^1].Data == run.Data && runs[^1].Zero == run.Zero)
            {
                runs[^1] = (runs[^1].Start, runs[^1].Length + run.Length, run.Data, run.Zero);
            }
            else
            {
                runs.Add(run);
            }
        }

        return runs;
    }

    /// <summary>The standard output of a peer command that must succeed.</summary>
    public static async Task<string> Output(string program, params string[] arguments) =>
        (await PeerTool.RunCheckedAsync(program, arguments, TimeSpan.FromSeconds(300))).StandardOutput;

    /// <summary><c>spindle serve ARGS</c> on 127.0.0.1, a free port, waiting for the URI it prints.</summary>
    public static Task<SpindleProcess> Serve(params string[] arguments) =>
        SpindleProcess.StartAsync(["serve", "--bind", "127.0.0.1", "--port", "0", "--print-uri", .. arguments]);
}

internal sealed record Qcow2Check(int ExitCode, int Corruptions, int Leaks, int Errors, string Output);
