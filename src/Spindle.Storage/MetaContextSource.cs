namespace Spindle.Storage;

/// <summary>
/// A metadata context a device answers besides <c>base:allocation</c> (NBD_OPT_SET_META_CONTEXT, then
/// NBD_CMD_BLOCK_STATUS): for example <c>qemu:allocation-depth</c> or <c>qemu:dirty-bitmap:NAME</c>, as qemu-nbd
/// offers them. The status words are the context's own (proto.md "Metadata querying"); the server only frames them.
/// </summary>
public abstract class MetaContextSource
{
    /// <summary>The full context name, namespace included ("qemu:dirty-bitmap:backup-1").</summary>
    public abstract string Name { get; }

    /// <summary>
    /// Describes the range starting at <paramref name="offset"/> with <see cref="ExtentList.Add(long, uint)"/>, in order,
    /// as <see cref="BlockDevice.GetExtentsAsync"/> does: at least one extent, none beyond the range, and the list's
    /// capacity respected (stopping early is fine).
    /// </summary>
    public abstract ValueTask GetStatusAsync(long offset, long length, ExtentList status, CancellationToken cancellationToken);
}
