using FsCheck;
using FsCheck.Fluent;
using Spindle.Storage;
using Spindle.Storage.Qcow2;
using Spindle.Testing;
using Xunit;

namespace Spindle.Qcow2.Tests;

/// <summary>
/// Random sequences of writes, zeroes, trims, flushes and reopens replayed on the backend and on an in-memory model:
/// every read agrees with the model, and qemu-img check stays clean (no leaks either after a clean close).
/// </summary>
public sealed class PropertyTests
{
    private const int Size = 2 << 20;

    public enum Kind
    {
        Write,
        Zero,
        ZeroNoHole,
        Trim,
        Flush,
        Reopen,
    }

    public sealed record Op(Kind Kind, int Offset, int Length, int Seed)
    {
        public override string ToString() => $"{Kind}({Offset},{Length})";
    }

    private static Arbitrary<Op[]> Operations()
    {
        var kind = Gen.Frequency(
            (8, Gen.Constant(Kind.Write)),
            (3, Gen.Constant(Kind.Zero)),
            (2, Gen.Constant(Kind.ZeroNoHole)),
            (2, Gen.Constant(Kind.Trim)),
            (1, Gen.Constant(Kind.Flush)),
            (1, Gen.Constant(Kind.Reopen)));
        var op = from k in kind
                 from offset in Gen.Choose(0, Size - 1)
                 from length in Gen.Frequency((3, Gen.Choose(1, 8192)), (1, Gen.Choose(1, 300_000)))
                 from seed in Gen.Choose(0, int.MaxValue - 1)
                 select new Op(k, offset, Math.Min(length, Size - offset), seed);
        return Gen.ListOf(op).Select(list => list.ToArray()).ToArbitrary();
    }

    [Theory]
    [InlineData("compat=1.1,cluster_size=4096")]
    [InlineData("compat=1.1,cluster_size=65536,extended_l2=on")]
    [InlineData("compat=0.10,cluster_size=512")]
    public void Backend_agrees_with_a_model_and_qemu_img_check_stays_clean(string options)
    {
        Prop.ForAll(Operations(), operations => Replay(options, operations))
            .Check(Config.QuickThrowOnFailure.WithMaxTest(12).WithEndSize(60));
    }

    private static bool Replay(string options, Op[] operations)
    {
        using var directory = new TempDirectory();
        var image = Qemu.Create(directory, "property.qcow2", options, Size).GetAwaiter().GetResult();
        var model = new byte[Size];
        var device = Qcow2Image.Open(image);
        try
        {
            var clusterSize = device.ClusterSize;
            foreach (var op in operations)
            {
                switch (op.Kind)
                {
                    case Kind.Write:
                        var data = Patterns.Random(op.Length, op.Seed);
                        device.WriteAsync(op.Offset, data, fua: op.Seed % 5 == 0, CancellationToken.None).AsTask().GetAwaiter().GetResult();
                        data.CopyTo(model.AsSpan(op.Offset));
                        break;
                    case Kind.Zero or Kind.ZeroNoHole:
                        device.WriteZeroesAsync(op.Offset, op.Length, op.Kind == Kind.ZeroNoHole ? ZeroFlags.NoHole : ZeroFlags.None, CancellationToken.None).AsTask().GetAwaiter().GetResult();
                        model.AsSpan(op.Offset, op.Length).Clear();
                        break;
                    case Kind.Trim:
                        device.TrimAsync(op.Offset, op.Length, fua: false, CancellationToken.None).AsTask().GetAwaiter().GetResult();
                        var first = (op.Offset + clusterSize - 1) / clusterSize * clusterSize;
                        var end = op.Offset + op.Length == Size ? Size : (op.Offset + op.Length) / clusterSize * clusterSize;
                        if (end > first)
                        {
                            model.AsSpan(first, end - first).Clear();
                        }

                        break;
                    case Kind.Flush:
                        device.FlushAsync(CancellationToken.None).AsTask().GetAwaiter().GetResult();
                        break;
                    default:
                        device.DisposeAsync().AsTask().GetAwaiter().GetResult();
                        device = Qcow2Image.Open(image);
                        break;
                }
            }

            var back = new byte[Size];
            device.ReadAsync(0, back, CancellationToken.None).AsTask().GetAwaiter().GetResult();
            Assert.True(back.AsSpan().SequenceEqual(model), "a read through the backend differs from the model");
        }
        finally
        {
            device.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }

        Qemu.AssertConsistent(image, allowLeaks: false).GetAwaiter().GetResult();
        File.WriteAllBytes(directory.File("model.raw"), model);
        Assert.True(Qemu.Same(directory.File("model.raw"), "raw", image, "qcow2").GetAwaiter().GetResult(), "qemu reads something else than the model");
        return true;
    }
}
