using Spindle.Protocol;

namespace Spindle.Client;

/// <summary>A run of bytes sharing one status in a metadata context (for <c>base:allocation</c>: HOLE and ZERO bits).</summary>
public readonly record struct NbdExtent(long Offset, long Length, uint Flags)
{
    public long End => Offset + Length;

    /// <summary><c>base:allocation</c> NBD_STATE_HOLE: not allocated.</summary>
    public bool IsHole => (Flags & (uint)AllocationFlags.Hole) != 0;

    /// <summary><c>base:allocation</c> NBD_STATE_ZERO: reads as zeroes.</summary>
    public bool IsZero => (Flags & (uint)AllocationFlags.Zero) != 0;

    /// <summary>How nbdinfo names a <c>base:allocation</c> status: data, hole, zero or "hole,zero".</summary>
    public string AllocationDescription => (IsHole, IsZero) switch
    {
        (false, false) => "data",
        (true, false) => "hole",
        (false, true) => "zero",
        (true, true) => "hole,zero",
    };
}

/// <summary>The answer to one BLOCK_STATUS request: extents from <see cref="Offset"/>, consecutive.</summary>
/// <remarks>
/// The server may describe less than was asked (ask again from <see cref="End"/>); without REQ_ONE the last extent
/// may reach past the requested range, even past the end of the export, and is returned as sent.
/// </remarks>
public sealed record BlockStatusResult(string Context, long Offset, IReadOnlyList<NbdExtent> Extents)
{
    public long End => Extents.Count == 0 ? Offset : Extents[^1].End;
}
