using Spindle.Protocol;

namespace Spindle.Server.Diagnostics;

/// <summary>
/// Requests answered, bytes moved and errors, per command: one set per connection (so concurrent connections never
/// share a cache line on the hot path) and one per export for the connections that have ended. A request costs two
/// uncontended interlocked adds and never allocates or locks, errors included: the errors the protocol defines
/// (proto.md, "Error values") have a slot each; only a value outside them, which the server never sends, takes a lock.
/// </summary>
public sealed class CommandCounters
{
    /// <summary>Commands counted separately: NBD_CMD_READ (0) to NBD_CMD_BLOCK_STATUS (7), then "other".</summary>
    internal const int Slots = 9;

    private readonly long[] _operations = new long[Slots];
    private readonly long[] _bytes = new long[Slots];
    private readonly long[] _knownErrors = new long[Slots * KnownErrors.Length];
    private readonly Lock _errorLock = new();
    private Dictionary<(int Slot, NbdError Error), long>? _otherErrors;

    /// <summary>The protocol's error values, each counted in its own slot.</summary>
    private static readonly NbdError[] KnownErrors =
    [
        NbdError.NotPermitted, NbdError.IO, NbdError.OutOfMemory, NbdError.InvalidArgument, NbdError.NoSpace,
        NbdError.Overflow, NbdError.NotSupported, NbdError.Shutdown,
    ];

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

        AddError(slot, error, 1);
    }

    private static int KnownIndex(NbdError error) => error switch
    {
        NbdError.NotPermitted => 0,
        NbdError.IO => 1,
        NbdError.OutOfMemory => 2,
        NbdError.InvalidArgument => 3,
        NbdError.NoSpace => 4,
        NbdError.Overflow => 5,
        NbdError.NotSupported => 6,
        NbdError.Shutdown => 7,
        _ => -1,
    };

    private void AddError(int slot, NbdError error, long count)
    {
        var known = KnownIndex(error);
        if (known >= 0)
        {
            Interlocked.Add(ref _knownErrors[(slot * KnownErrors.Length) + known], count);
            return;
        }

        lock (_errorLock)
        {
            _otherErrors ??= [];
            _otherErrors[(slot, error)] = _otherErrors.GetValueOrDefault((slot, error)) + count;
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
        var errors = new List<(int, NbdError, long)>();
        for (var slot = 0; slot < Slots; slot++)
        {
            for (var known = 0; known < KnownErrors.Length; known++)
            {
                var count = Volatile.Read(ref _knownErrors[(slot * KnownErrors.Length) + known]);
                if (count != 0)
                {
                    errors.Add((slot, KnownErrors[known], count));
                }
            }
        }

        lock (_errorLock)
        {
            if (_otherErrors is not null)
            {
                errors.AddRange(_otherErrors.Select(pair => (pair.Key.Slot, pair.Key.Error, pair.Value)));
            }
        }

        return errors;
    }

    /// <summary>Errors of every kind, all commands together.</summary>
    public long TotalErrors => Errors().Sum(error => error.Count);

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
            AddError(slot, error, count);
        }
    }
}
