using System.Reflection;
using Spindle.Fuzz;
using Xunit;

namespace Spindle.Fuzz.Tests;

/// <summary>
/// The meta-tests: a parser without a fuzz target fails the build's tests (STYLE.md habit 13). Protocol parsers are
/// found by reflection (public static TryRead* / TryParse* / TryDecode*), so a new one cannot slip in unfuzzed; the
/// parsers outside the protocol are listed here.
/// </summary>
public sealed class CoverageTests
{
    /// <summary>Parsers outside Spindle.Protocol that take bytes or text from outside: (assembly, type, method).</summary>
    private static readonly (string Assembly, string Type, string Method)[] OtherParsers =
    [
        ("Spindle.Server", "Spindle.Server.Negotiation.ServerNegotiator", "HandleOptionAsync"),
        ("Spindle.Server", "Spindle.Server.Connections.NbdConnection", "ReadRequestsAsync"),
        ("Spindle.Client", "Spindle.Client.Connection.NbdConnection", "ReadLoopAsync"),
        ("Spindle.Client", "Spindle.Client.Connection.NbdConnection", "ReadChunkAsync"),
        ("Spindle.Client", "Spindle.Client.Negotiation.ClientNegotiator", "InfoOrGoAsync"),
        ("Spindle.Client", "Spindle.Client.NbdUri", "Parse"),
        ("Spindle.Client", "Spindle.Client.NbdUri", "TryParse"),
        ("spindle", "Spindle.Cli.Hosting.IniConfigurationReader", "Parse"),
    ];

    private static readonly HashSet<(string Type, string Method)> Covered =
        [.. FuzzTargets.All.SelectMany(FuzzTargets.CoverageOf).Select(covers => (covers.TypeName, covers.Method))];

    [Fact]
    public void Every_public_protocol_try_parser_has_a_fuzz_target()
    {
        var parsers = typeof(Protocol.NbdRequest).Assembly.GetExportedTypes()
            .SelectMany(type => type.GetMethods(BindingFlags.Public | BindingFlags.Static | BindingFlags.DeclaredOnly))
            .Where(method => method.Name.StartsWith("TryRead", StringComparison.Ordinal)
                || method.Name.StartsWith("TryParse", StringComparison.Ordinal)
                || method.Name.StartsWith("TryDecode", StringComparison.Ordinal))
            .Select(method => (method.DeclaringType!.FullName!, method.Name))
            .Distinct()
            .ToList();
        Assert.True(parsers.Count >= 20, $"found only {parsers.Count} protocol parsers: the reflection is looking in the wrong place");
        var missing = parsers.Where(parser => !Covered.Contains(parser)).ToList();
        Assert.True(missing.Count == 0, "protocol parsers with no fuzz target (add one under tests/Spindle.Fuzz/Targets with [Covers]): "
            + string.Join(", ", missing.Select(parser => $"{parser.Item1}.{parser.Name}")));
    }

    [Fact]
    public void Every_parser_outside_the_protocol_has_a_fuzz_target()
    {
        var missing = OtherParsers.Where(parser => !Covered.Contains((parser.Type, parser.Method))).ToList();
        Assert.True(missing.Count == 0, "parsers with no fuzz target: " + string.Join(", ", missing.Select(parser => $"{parser.Type}.{parser.Method}")));
    }

    [Fact]
    public void Every_parser_a_target_names_exists()
    {
        var stale = FuzzTargets.All
            .SelectMany(target => FuzzTargets.CoverageOf(target).Select(covers => (Target: target.Name, Covers: covers)))
            .Where(entry => Resolve(entry.Covers.Assembly, entry.Covers.TypeName, entry.Covers.Method) is null)
            .Select(entry => $"{entry.Target} names {entry.Covers.TypeName}.{entry.Covers.Method}")
            .ToList();
        Assert.True(stale.Count == 0, "targets naming parsers that no longer exist (renamed?): " + string.Join(", ", stale));
        Assert.All(OtherParsers, parser => Assert.NotNull(Resolve(parser.Assembly, parser.Type, parser.Method)));
    }

    private static MethodInfo? Resolve(string assembly, string type, string method) =>
        Assembly.Load(assembly).GetType(type)?
            .GetMethods(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Static | BindingFlags.Instance | BindingFlags.DeclaredOnly)
            .FirstOrDefault(candidate => candidate.Name == method);
}
