using BenchmarkDotNet.Attributes;
using Spindle.Protocol;
using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Storage;

namespace Spindle.Benchmarks;

/// <summary>
/// The server's hot path: parsing a request, writing a reply, and a 4 KiB READ and WRITE through a whole
/// in-memory connection (negotiated with structured replies, memory backend), 64 requests per batch.
/// </summary>
[MemoryDiagnoser]
public class HotPathBenchmarks
{
    private const int Batch = 64;
    private const int Size = 4096;

    private readonly byte[] _header = new byte[28];
    private readonly byte[] _reply = new byte[64];
    private NbdServer _server = null!;
    private ExportCatalog _catalog = null!;
    private ReplayTransport _reads = null!;
    private ReplayTransport _writes = null!;
    private Task _readConnection = null!;
    private Task _writeConnection = null!;

    /// <summary>Log the server's messages to the console (self-test only).</summary>
    public bool Verbose { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        new NbdRequest(CommandFlags.None, NbdCommand.Read, 42, 1 << 20, 4096).WriteTo(_header);
        var device = new MemoryBlockDevice(64L << 20);
        var fill = new byte[1 << 20];
        new Random(1).NextBytes(fill);
        for (var i = 0; i < 64; i++)
        {
            device.WriteAsync((long)i << 20, fill, fua: false, CancellationToken.None).AsTask().Wait();
        }

        _catalog = new ExportCatalog();
        _catalog.Add(new Export(new ExportOptions { Name = "bench" }, device));
        _server = new NbdServer(new ServerOptions(), _catalog, Verbose ? new ConsoleLog() : null);

        _reads = new ReplayTransport(Handshake(), Requests(NbdCommand.Read), Batch);
        _writes = new ReplayTransport(Handshake(), Requests(NbdCommand.Write), Batch);
        _readConnection = _server.ServeAsync(_reads);
        _writeConnection = _server.ServeAsync(_writes);

        // Warm everything (pools fill, code tiers up) before measuring.
        for (var i = 0; i < 200; i++)
        {
            _reads.RunBatch();
            _writes.RunBatch();
        }
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _reads.Abort();
        _writes.Abort();
        _server.StopAsync().Wait();
        Task.WaitAll([_readConnection, _writeConnection], TimeSpan.FromSeconds(10));
        _catalog.DisposeAsync().AsTask().Wait();
    }

    [Benchmark]
    public NbdRequest ParseRequest()
    {
        NbdRequest.TryRead(_header, out var request);
        return request;
    }

    [Benchmark]
    public int WriteReplyHeaders() =>
        SimpleReply.Write(_reply, NbdError.None, 42) +
        StructuredReplyChunks.WriteOffsetDataPrefix(_reply.AsSpan(16), ReplyFlags.Done, 42, 1 << 20, 4096);

    /// <summary>One 4 KiB READ answered with a structured OFFSET_DATA chunk, per operation.</summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public void Read4KiB() => _reads.RunBatch();

    /// <summary>One 4 KiB WRITE (payload included) answered with a simple reply, per operation.</summary>
    [Benchmark(OperationsPerInvoke = Batch)]
    public void Write4KiB() => _writes.RunBatch();

    private static byte[] Handshake()
    {
        var bytes = new List<byte> { 0, 0, 0, 3 }; // client flags: fixed newstyle, no zeroes
        var header = new byte[OptionHeader.Length];
        OptionHeader.Write(header, NbdOption.StructuredReply, 0);
        bytes.AddRange(header);
        var go = new InfoRequest("bench", []).ToBytes();
        OptionHeader.Write(header, NbdOption.Go, (uint)go.Length);
        bytes.AddRange(header);
        bytes.AddRange(go);
        return [.. bytes];
    }

    private static byte[] Requests(NbdCommand command)
    {
        var payload = new byte[Size];
        new Random(2).NextBytes(payload);
        var bytes = new List<byte>();
        var header = new byte[28];
        for (var i = 0; i < Batch; i++)
        {
            new NbdRequest(CommandFlags.None, command, (ulong)i, (ulong)i * 65536 % (48 << 20), Size).WriteTo(header);
            bytes.AddRange(header);
            if (command == NbdCommand.Write)
            {
                bytes.AddRange(payload);
            }
        }

        return [.. bytes];
    }
}

/// <summary>Minimal console logger for the self-test.</summary>
internal sealed class ConsoleLog : Microsoft.Extensions.Logging.ILoggerFactory, Microsoft.Extensions.Logging.ILogger
{
    public void AddProvider(Microsoft.Extensions.Logging.ILoggerProvider provider)
    {
    }

    public Microsoft.Extensions.Logging.ILogger CreateLogger(string categoryName) => this;

    public void Dispose()
    {
    }

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => true;

    public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        Console.WriteLine($"{logLevel}: {formatter(state, exception)} {exception}");
}
