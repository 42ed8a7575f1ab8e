using Spindle.Protocol;

namespace Spindle.Server.Diagnostics;

/// <summary>
/// Requests answered, bytes moved and errors, per command: one set per connection (so concurrent connections never
/// share a cache line on the hot path) and one per export for the connections that have ended. A request costs two
/// uncontended interlocked adds; errors, which are rare, take a lock.
/// </summary>
public sealed class CommandCounters
{
    /// <summary>Commands counted separately: NBD_CMD_READ (0) to NBD_CMD_BLOCK_STATUS (7), then "other".</summary>
    internal const int Slots = 9;

    private readonly long[] _operations = new long[Slots];
    private readonly long[] _bytes = new long[Slots];
    private readonly Lock _errorLock = new();
    private Dictionary<(int Slot, NbdError Error), long>? _errors;

    /// <summary>The command names used as the <c>command</c> tag, by slot (the spec's names, lower case).</summary>
    public static IReadOnlyList<string> CommandNames { get; } =
        ["read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status", "other"];

    internal static int SlotOf(NbdCommand command) => (uint)command < Slots - 1 ? (int)command : Slots - 1;

    /// <summary>Counts one answered request: <paramref name="bytes"/> is the data it moved or the range it covered.</summary>
    internal void Record(int slot, long bytes, NbdError error)
    {
        Interlocked.Increment(ref _operations[slot]);
        if (error == NbdError.None)
        {
            if (bytes != 0)
            {
                Interlocked.Add(ref _bytes[slot], bytes);
            }

            return;
        }

        lock (_errorLock)
        {
            _errors ??= [];
            _errors[(slot, error)] = _errors.GetValueOrDefault((slot, error)) + 1;
        }
    }

    /// <summary>Requests answered (successfully or not) for the command in <paramref name="slot"/>.</summary>
    public long Operations(int slot) => Volatile.Read(ref _operations[slot]);

    /// <summary>Bytes moved (READ, WRITE) or covered (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) by successful requests.</summary>
    public long Bytes(int slot) => Volatile.Read(ref _bytes[slot]);

    /// <summary>Every request answered, all commands together.</summary>
    public long TotalOperations
    {
        get
        {
            long total = 0;
            for (var slot = 0; slot < Slots; slot++)
            {
                total += Operations(slot);
            }

            return total;
        }
    }

    /// <summary>Errors by command slot and NBD error, copied.</summary>
    public IReadOnlyList<(int Slot, NbdError Error, long Count)> Errors()
    {
        lock (_errorLock)
        {
            return _errors is null ? [] : [.. _errors.Select(pair => (pair.Key.Slot, pair.Key.Error, pair.Value))];
        }
    }

    /// <summary>Errors of every kind, all commands together.</summary>
    public long TotalErrors
    {
        get
        {
            lock (_errorLock)
            {
                return _errors?.Values.Sum() ?? 0;
            }
        }
    }

    /// <summary>Adds another set's counts to this one (a connection's, when it ends).</summary>
    internal void Add(CommandCounters other)
    {
        for (var slot = 0; slot < Slots; slot++)
        {
            Interlocked.Add(ref _operations[slot], other.Operations(slot));
            Interlocked.Add(ref _bytes[slot], other.Bytes(slot));
        }

        foreach (var (slot, error, count) in other.Errors())
        {
            lock (_errorLock)
            {
                _errors ??= [];
                _errors[(slot, error)] = _errors.GetValueOrDefault((slot, error)) + count;
            }
        }
    }
}
