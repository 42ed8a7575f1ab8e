using Spindle.Protocol;
using Spindle.Server.Diagnostics;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>
/// The per-connection counters every answered request goes through: exact counts, and no allocation on the request
/// path (errors included), so metrics cost a request two uncontended interlocked adds and nothing else.
/// </summary>
public sealed class CommandCountersTests
{
    [Fact]
    public void Counts_operations_bytes_and_errors_per_command_and_folds_a_connection_into_its_export()
    {
        var connection = new CommandCounters();
        var read = CommandCounters.SlotOf(NbdCommand.Read);
        var write = CommandCounters.SlotOf(NbdCommand.Write);
        connection.Record(read, 4096, NbdError.None);
        connection.Record(read, 512, NbdError.None);
        connection.Record(write, 65536, NbdError.None);
        connection.Record(write, 65536, NbdError.NoSpace);
        connection.Record(write, 4096, NbdError.Shutdown);
        connection.Record(CommandCounters.SlotOf((NbdCommand)77), 0, (NbdError)99);

        Assert.Equal(2, connection.Operations(read));
        Assert.Equal(4608, connection.Bytes(read));
        Assert.Equal(3, connection.Operations(write));
        Assert.Equal(65536, connection.Bytes(write));
        Assert.Equal(6, connection.TotalOperations);
        Assert.Equal(3, connection.TotalErrors);
        Assert.Equal(
            [(write, NbdError.NoSpace, 1L), (write, NbdError.Shutdown, 1L), (CommandCounters.Slots - 1, (NbdError)99, 1L)],
            connection.Errors().OrderBy(e => e.Slot).ThenBy(e => e.Error));

        var export = new CommandCounters();
        export.Record(write, 100, NbdError.NoSpace);
        export.Add(connection);
        Assert.Equal(4, export.Operations(write));
        Assert.Equal(65536, export.Bytes(write));
        Assert.Contains((write, NbdError.NoSpace, 2L), export.Errors());
        Assert.Equal(4, export.TotalErrors);
    }

    [Fact]
    public void Recording_a_request_allocates_nothing_errors_included()
    {
        var counters = new CommandCounters();
        var errors = new[] { NbdError.None, NbdError.IO, NbdError.InvalidArgument, NbdError.Shutdown, NbdError.None };
        for (var i = 0; i < 100; i++)
        {
            counters.Record(i % CommandCounters.Slots, i, errors[i % errors.Length]);
        }

        var before = GC.GetAllocatedBytesForCurrentThread();
        for (var i = 0; i < 100_000; i++)
        {
            counters.Record(i % CommandCounters.Slots, i, errors[i % errors.Length]);
        }

        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
        Assert.Equal(100_100, counters.TotalOperations);
        Assert.Equal(100_100 * 3 / 5, counters.TotalErrors);
    }
}
