using System.Reflection;

namespace Spindle.Fuzz;

/// <summary>
/// One fuzz target: a parser (or a peer's whole parsing path) fed arbitrary bytes, and the invariant it must keep.
/// A broken invariant throws (<see cref="InvariantViolation"/>, or whatever unexpected exception escaped the code under
/// test), which AFL++ records as a crash and the replay tests report as a failure.
/// </summary>
/// <remarks>
/// Targets call the real parsers, never copies of them. The name (the class name) is what <c>Spindle.Fuzz fuzz NAME</c>
/// takes and names the seed folder <c>Corpus/NAME</c> and the crash folder <c>Regressions/NAME</c>.
/// </remarks>
public abstract class FuzzTarget
{
    public string Name => GetType().Name;

    /// <summary>Runs one input. Must finish in bounded time: targets that run tasks bound them themselves.</summary>
    public abstract void Run(byte[] input);

    /// <summary>Valid (or interestingly invalid) inputs to start from, written to <c>Corpus/NAME</c> by <c>seeds</c>.</summary>
    public abstract IEnumerable<(string Name, byte[] Bytes)> Seeds();

    public override string ToString() => Name;
}

/// <summary>
/// Names a parser a target exercises, so the meta-test can tell that every parser has a target. The type is named
/// by its full name (internal types of assemblies that do not expose their internals are named that way too).
/// </summary>
[AttributeUsage(AttributeTargets.Class, AllowMultiple = true)]
public sealed class CoversAttribute : Attribute
{
    public CoversAttribute(Type type, string method)
    {
        ArgumentNullException.ThrowIfNull(type);
        TypeName = type.FullName!;
        Assembly = type.Assembly.GetName().Name!;
        Method = method;
    }

    public CoversAttribute(string assembly, string typeName, string method)
    {
        TypeName = typeName;
        Assembly = assembly;
        Method = method;
    }

    public string Assembly { get; }

    public string TypeName { get; }

    public string Method { get; }
}

/// <summary>Thrown when a target's invariant breaks: the message says which and how.</summary>
public sealed class InvariantViolation(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>Every target in this assembly, found by reflection so a new one cannot be forgotten by the runners.</summary>
public static class FuzzTargets
{
    private static readonly Lazy<IReadOnlyList<FuzzTarget>> Targets = new(() =>
        [.. typeof(FuzzTarget).Assembly.GetTypes()
            .Where(type => type.IsSubclassOf(typeof(FuzzTarget)) && !type.IsAbstract)
            .Select(type => (FuzzTarget)Activator.CreateInstance(type)!)
            .OrderBy(target => target.Name, StringComparer.Ordinal)]);

    public static IReadOnlyList<FuzzTarget> All => Targets.Value;

    public static FuzzTarget? Find(string name) =>
        All.FirstOrDefault(target => string.Equals(target.Name, name, StringComparison.OrdinalIgnoreCase));

    /// <summary>The parsers a target declares it covers.</summary>
    public static IEnumerable<CoversAttribute> CoverageOf(FuzzTarget target) =>
        target.GetType().GetCustomAttributes<CoversAttribute>();
}
