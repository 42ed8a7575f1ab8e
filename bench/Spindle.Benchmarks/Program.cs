using BenchmarkDotNet.Running;

// dotnet run -c Release --project bench/Spindle.Benchmarks -- --filter '*'
if (args is ["--selftest"])
{
    var benchmarks = new Spindle.Benchmarks.HotPathBenchmarks { Verbose = true };
    benchmarks.Setup();
    benchmarks.Read4KiB();
    benchmarks.Write4KiB();
    benchmarks.Cleanup();
    Console.WriteLine("selftest passed");
    return;
}

BenchmarkSwitcher.FromAssembly(typeof(Spindle.Benchmarks.HotPathBenchmarks).Assembly).Run(args);
