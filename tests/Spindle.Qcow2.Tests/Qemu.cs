using System.Text.Json;
using Spindle.Storage;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>qemu-img and qemu-io, the oracle every qcow2 test is checked against.</summary>
internal static class Qemu
{
    public static Task<ProcessResult> Img(params string[] arguments) => PeerTool.RunCheckedAsync("qemu-img", arguments);

    /// <summary>Runs qemu-io commands (each a -c) on an image, failing the test on any error qemu-io reports.</summary>
    public static async Task<ProcessResult> Io(string image, string format, params string[] commands)
    {
        var arguments = new List<string> { "-f", format };
        foreach (var command in commands)
        {
            arguments.Add("-c");
            arguments.Add(command);
        }

        arguments.Add(image);
        var result = await PeerTool.RunCheckedAsync("qemu-io", arguments);
        Assert.DoesNotContain("failed", result.StandardOutput + result.StandardError, StringComparison.OrdinalIgnoreCase);
        return result;
    }

    /// <summary>Creates a qcow2 image with qemu-img create -o OPTIONS.</summary>
    public static async Task<string> Create(TempDirectory directory, string name, string options, long size)
    {
        var path = directory.File(name);
        await Img("create", "-q", "-f", "qcow2", "-o", options, path, size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        return path;
    }

    /// <summary>qemu-img check --output=json: (exit code, corruptions, leaks, check errors).</summary>
    public static async Task<CheckResult> Check(string image, bool repairLeaks = false)
    {
        var arguments = new List<string> { "check", "--output=json", "-f", "qcow2" };
        if (repairLeaks)
        {
            arguments.AddRange(["-r", "leaks"]);
        }

        arguments.Add(image);
        var result = await PeerTool.RunAsync("qemu-img", arguments);
        Assert.True(result.ExitCode is 0 or 3, $"qemu-img check found corruption: {result}");
        using var json = JsonDocument.Parse(result.StandardOutput[result.StandardOutput.IndexOf('{', StringComparison.Ordinal)..]);
        var root = json.RootElement;
        int Read(string name) => root.TryGetProperty(name, out var value) ? value.GetInt32() : 0;
        return new CheckResult(result.ExitCode, Read("corruptions"), Read("leaks"), Read("check-errors"), result.ToString());
    }

    /// <summary>Asserts qemu-img check finds no corruption and no errors (leaks are allowed).</summary>
    public static async Task AssertConsistent(string image, bool allowLeaks = true)
    {
        var check = await Check(image);
        Assert.True(check.Corruptions == 0 && check.Errors == 0, $"qemu-img check: {check.Output}");
        if (!allowLeaks)
        {
            Assert.True(check.Leaks == 0, $"qemu-img check found leaks: {check.Output}");
        }
    }

    /// <summary>qemu-img compare: true when the two images read the same.</summary>
    public static async Task<bool> Same(string first, string firstFormat, string second, string secondFormat)
    {
        var result = await PeerTool.RunAsync("qemu-img", ["compare", "-f", firstFormat, "-F", secondFormat, first, second]);
        Assert.True(result.ExitCode is 0 or 1, $"qemu-img compare failed: {result}");
        return result.ExitCode == 0;
    }

    /// <summary>Reads every byte of <paramref name="device"/> into a new raw file.</summary>
    public static async Task<string> DumpToRaw(BlockDevice device, string path, int chunk = 1 << 20)
    {
        await using var output = new FileStream(path, FileMode.Create, FileAccess.Write);
        var buffer = new byte[chunk];
        for (long offset = 0; offset < device.Size; offset += chunk)
        {
            var length = (int)Math.Min(chunk, device.Size - offset);
            await device.ReadAsync(offset, buffer.AsMemory(0, length), CancellationToken.None);
            await output.WriteAsync(buffer.AsMemory(0, length));
        }

        return path;
    }

    /// <summary>qemu-img info --output=json as a parsed document.</summary>
    public static async Task<JsonDocument> Info(string image, params string[] extra)
    {
        var result = await Img(["info", "--output=json", .. extra, image]);
        return JsonDocument.Parse(result.StandardOutput);
    }
}

internal sealed record CheckResult(int ExitCode, int Corruptions, int Leaks, int Errors, string Output);
