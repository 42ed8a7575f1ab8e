using SharpFuzz;
using Spindle.Fuzz;

// Spindle.Fuzz list                      the target names, one a line (scripts/fuzz.sh runs each)
// Spindle.Fuzz fuzz NAME                 runs NAME under afl-fuzz (SharpFuzz's in-process fork server); once otherwise
// Spindle.Fuzz replay NAME PATH...       runs NAME on each file (or every file of each folder); exit 1 on a failure
// Spindle.Fuzz seeds DIR                 writes every target's seeds to DIR/NAME/
switch (args)
{
    case ["list"]:
        foreach (var target in FuzzTargets.All)
        {
            Console.WriteLine(target.Name);
        }

        return 0;

    case ["fuzz", var name]:
        {
            var target = Find(name);

            // afl-fuzz keeps the input, not the exception: SPINDLE_FUZZ_LOG names a file that gets what broke, including
            // an exception on another thread that ends the process (one left running by an earlier input, say).
            var log = Environment.GetEnvironmentVariable("SPINDLE_FUZZ_LOG");
            void Record(string what, object exception)
            {
                if (log is not null)
                {
                    File.AppendAllText(log, $"{DateTime.UtcNow:O} {name} {what}: {exception}\n");
                }
            }

            AppDomain.CurrentDomain.UnhandledException += (_, e) => Record("unhandled exception on another thread", e.ExceptionObject);
            Fuzzer.Run(stream =>
            {
                using var buffer = new MemoryStream();
                stream.CopyTo(buffer);
                try
                {
                    target.Run(buffer.ToArray());
                }
                catch (Exception exception)
                {
                    Record($"input of {buffer.Length} bytes ({Convert.ToHexString(buffer.GetBuffer(), 0, (int)Math.Min(buffer.Length, 64))}...)", exception);
                    throw;
                }
            });
            return 0;
        }

    case ["replay", var name, .. var paths]:
        {
            var target = Find(name);
            var failed = 0;
            foreach (var file in paths.SelectMany<string, string>(path => Directory.Exists(path) ? Directory.GetFiles(path).Order(StringComparer.Ordinal) : [path]))
            {
                try
                {
                    target.Run(File.ReadAllBytes(file));
                    Console.WriteLine($"ok    {file}");
                }
                catch (Exception exception)
                {
                    failed++;
                    Console.WriteLine($"FAIL  {file}: {exception.GetType().Name}: {exception.Message}");
                    Console.Error.WriteLine(exception);
                }
            }

            return failed == 0 ? 0 : 1;
        }

    case ["seeds", var directory]:
        foreach (var target in FuzzTargets.All)
        {
            var folder = Path.Combine(directory, target.Name);
            Directory.CreateDirectory(folder);
            var seeds = target.Seeds().ToList();
            foreach (var (seed, bytes) in seeds)
            {
                File.WriteAllBytes(Path.Combine(folder, seed), bytes);
            }

            Console.WriteLine($"{target.Name}: {seeds.Count} seeds");
        }

        return 0;

    default:
        Console.Error.WriteLine("usage: Spindle.Fuzz list | fuzz NAME | replay NAME PATH... | seeds DIR");
        return 2;
}

static FuzzTarget Find(string name) =>
    FuzzTargets.Find(name) ?? throw new ArgumentException($"no fuzz target '{name}'; the targets are: {string.Join(", ", FuzzTargets.All.Select(t => t.Name))}");
