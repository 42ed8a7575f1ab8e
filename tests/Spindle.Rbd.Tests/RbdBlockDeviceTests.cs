using Spindle.Protocol;
using Spindle.Storage;
using Spindle.Storage.Rbd;
using Spindle.Testing;
using Xunit;

namespace Spindle.Rbd.Tests;

/// <summary>The backend itself against the real cluster, every result checked through librbd's other clients.</summary>
public sealed class RbdBlockDeviceTests(CephCluster cluster)
{
    [Fact(Timeout = 120_000)]
    public async Task Open_reports_the_image_size_and_every_write_feature()
    {
        var image = await cluster.CreateImageAsync("features", 48L << 20);
        await using var device = cluster.Open(image);

        Assert.Equal(48L << 20, device.Size);
        var expected = BlockDeviceFeatures.Write | BlockDeviceFeatures.Flush | BlockDeviceFeatures.Fua | BlockDeviceFeatures.Trim |
                       BlockDeviceFeatures.WriteZeroes | BlockDeviceFeatures.FastZero | BlockDeviceFeatures.Extents | BlockDeviceFeatures.SharedCache;
        Assert.Equal(expected, device.Features);
        Assert.Equal($"rbd {image}", device.Description);
    }

    [Fact(Timeout = 120_000)]
    public async Task Hundreds_of_concurrent_writes_land_where_rbd_export_finds_them()
    {
        var image = await cluster.CreateImageAsync("concurrent");
        await using (var device = cluster.Open(image))
        {
            // 256 writes in flight at once, 64 KiB each at distinct unaligned offsets, then 256 concurrent reads.
            const int count = 256;
            const int length = 64 * 1024;
            long OffsetOf(int i) => (i * 241_013L % (CephCluster.DefaultImageSize / length - 1)) * length + (i % 7) * 512 + 3;
            var writes = Enumerable.Range(0, count)
                .Select(i => device.WriteAsync(OffsetOf(i), Patterns.Generate(OffsetOf(i), length, seed: 7), fua: false, CancellationToken.None).AsTask())
                .ToArray();
            await Task.WhenAll(writes);
            await device.FlushAsync(CancellationToken.None);

            var buffers = Enumerable.Range(0, count).Select(_ => new byte[length]).ToArray();
            await Task.WhenAll(Enumerable.Range(0, count).Select(i => device.ReadAsync(OffsetOf(i), buffers[i], CancellationToken.None).AsTask()));
            for (var i = 0; i < count; i++)
            {
                Assert.True(Patterns.Generate(OffsetOf(i), length, seed: 7).AsSpan().SequenceEqual(buffers[i]), $"read {i} at {OffsetOf(i)} differs");
            }
        }

        var exported = await cluster.ExportAsync(image);
        var expected = new byte[CephCluster.DefaultImageSize];
        for (var i = 0; i < 256; i++)
        {
            var offset = i * 241_013L % (CephCluster.DefaultImageSize / 65536 - 1) * 65536 + (i % 7) * 512 + 3;
            Patterns.Fill(expected.AsSpan((int)offset, 65536), offset, seed: 7);
        }

        Assert.True(expected.AsSpan().SequenceEqual(exported), "rbd export differs from what was written");
    }

    [Fact(Timeout = 120_000)]
    public async Task Write_zeroes_clears_unaligned_ranges_exactly_which_a_discard_would_not()
    {
        var image = await cluster.CreateImageAsync("zeroes");
        const int span = 12 << 20;
        var data = Patterns.Generate(0, span, seed: 3);
        await using (var device = cluster.Open(image))
        {
            await device.WriteAsync(0, data, fua: false, CancellationToken.None);

            // Neither end is aligned to anything: librbd's discard would leave most of this range untouched.
            await device.WriteZeroesAsync(1000, (5 << 20) + 123, ZeroFlags.None, CancellationToken.None);
            await device.WriteZeroesAsync((8 << 20) + 17, 70_000, ZeroFlags.NoHole | ZeroFlags.Fua, CancellationToken.None);
        }

        data.AsSpan(1000, (5 << 20) + 123).Clear();
        data.AsSpan((8 << 20) + 17, 70_000).Clear();
        var exported = await cluster.ExportAsync(image);
        Assert.True(data.AsSpan().SequenceEqual(exported.AsSpan(0, span)), "the zeroed ranges (and only they) must read as zeroes");
        Assert.True(exported.AsSpan(span).IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact(Timeout = 120_000)]
    public async Task Fast_zero_that_must_keep_the_range_allocated_fails_with_ENOTSUP_and_changes_nothing()
    {
        var image = await cluster.CreateImageAsync("fastzero");
        var data = Patterns.Generate(0, 1 << 20, seed: 4);
        await using var device = cluster.Open(image);
        await device.WriteAsync(0, data, fua: false, CancellationToken.None);

        var failure = await Assert.ThrowsAsync<BlockDeviceException>(async () =>
            await device.WriteZeroesAsync(0, 1 << 20, ZeroFlags.FastOnly | ZeroFlags.NoHole, CancellationToken.None));
        Assert.Equal(NbdError.NotSupported, failure.Error);

        // Without NO_HOLE zeroing is a discard inside librbd: fast, so it is done.
        await device.WriteZeroesAsync(4096, 8192, ZeroFlags.FastOnly, CancellationToken.None);
        var read = new byte[1 << 20];
        await device.ReadAsync(0, read, CancellationToken.None);
        data.AsSpan(4096, 8192).Clear();
        Assert.True(data.AsSpan().SequenceEqual(read));
    }

    [Fact(Timeout = 120_000)]
    public async Task Trim_with_FUA_and_flush_complete_and_trimmed_whole_objects_read_as_zeroes()
    {
        var image = await cluster.CreateImageAsync("trim");
        await using var device = cluster.Open(image);
        await device.WriteAsync(0, Patterns.Generate(0, 12 << 20, seed: 5), fua: true, CancellationToken.None);

        // Objects are 4 MiB: discarding one whole object removes it, so it reads as zeroes.
        await device.TrimAsync(4 << 20, 4 << 20, fua: true, CancellationToken.None);
        await device.FlushAsync(CancellationToken.None);

        var read = await cluster.PythonReadAsync(image, 4 << 20, 4 << 20);
        Assert.True(read.AsSpan().IndexOfAnyExcept((byte)0) < 0, "a discarded whole object reads as zeroes");
        var after = await cluster.PythonReadAsync(image, 8 << 20, 4096);
        Assert.True(Patterns.Generate(8 << 20, 4096, seed: 5).AsSpan().SequenceEqual(after), "data after the trimmed range is kept");
    }

    [Fact(Timeout = 120_000)]
    public async Task Extents_report_written_ranges_as_data_and_untouched_objects_as_holes()
    {
        var image = await cluster.CreateImageAsync("extents");
        await using var device = cluster.Open(image);
        await device.WriteAsync(20 << 20, Patterns.Generate(20 << 20, 100_000, seed: 6), fua: false, CancellationToken.None);

        var extents = new ExtentList(1024);
        await device.GetExtentsAsync(0, device.Size, extents, CancellationToken.None);
        Assert.True(extents.Count > 0);
        Assert.True(extents.TotalLength <= device.Size);

        // Walk the extents: every written byte must be described as data (reporting it as a hole would let a copy
        // skip it); an object nobody wrote, far from the start, is a hole that reads as zeroes.
        var position = 0L;
        AllocationFlags? at20M = null;
        AllocationFlags? at40M = null;
        foreach (var extent in extents.Items)
        {
            if (position <= 20 << 20 && 20 << 20 < position + extent.Length)
            {
                at20M = extent.Flags;
            }

            if (position <= (20 << 20) + 99_999 && (20 << 20) + 99_999 < position + extent.Length)
            {
                Assert.Equal(AllocationFlags.Data, extent.Flags);
            }

            if (position <= 40 << 20 && 40 << 20 < position + extent.Length)
            {
                at40M = extent.Flags;
            }

            position += extent.Length;
        }

        Assert.Equal(AllocationFlags.Data, at20M);
        if (extents.TotalLength > 40 << 20)
        {
            Assert.Equal(AllocationFlags.Hole | AllocationFlags.Zero, at40M);
        }

        // A request for one extent gets exactly one, no longer than asked.
        var one = new ExtentList(1);
        await device.GetExtentsAsync(20 << 20, 4096, one, CancellationToken.None);
        Assert.Equal(1, one.Count);
        Assert.Equal(new Extent(4096, AllocationFlags.Data), one[0]);
    }

    [Fact(Timeout = 120_000)]
    public async Task A_write_while_another_client_holds_the_exclusive_lock_and_refuses_it_fails_with_EPERM()
    {
        var image = await cluster.CreateImageAsync("locked");
        const string script = """
            import sys, time, rados, rbd
            conf, keyring, spec = sys.argv[1:4]
            pool, name = spec.split("/", 1)
            cluster = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
            cluster.connect(timeout=20)
            ioctx = cluster.open_ioctx(pool)
            image = rbd.Image(ioctx, name)
            image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            print("locked", flush=True)
            time.sleep(120)
            """;
        var locked = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var holder = PeerTool.Start(PeerTool.SystemPython, ["-c", script, cluster.ConfigFile, cluster.Keyring, image], onOutput: line =>
        {
            if (line == "locked")
            {
                locked.TrySetResult();
            }
        });
        try
        {
            await locked.Task.WaitAsync(TimeSpan.FromSeconds(60), TestContext.Current.CancellationToken);
            await using var device = cluster.Open(image);

            // Reads need no lock; a write asks the holder for it, and a holder in exclusive mode says no.
            await device.ReadAsync(0, new byte[4096], CancellationToken.None);
            var failure = await Assert.ThrowsAsync<BlockDeviceException>(async () =>
                await device.WriteAsync(0, new byte[4096], fua: false, CancellationToken.None));
            Assert.Equal(NbdError.NotPermitted, failure.Error);
            Assert.Contains("exclusive lock", failure.Message, StringComparison.Ordinal);
        }
        finally
        {
            await PeerTool.StopAsync(holder);
            holder.Dispose();
        }
    }

    [Fact(Timeout = 120_000)]
    public async Task An_image_in_a_namespace_is_opened_by_pool_namespace_and_name()
    {
        var suffix = Guid.NewGuid().ToString("N")[..6];
        var nameSpace = "ns" + suffix;
        var name = "img" + suffix;
        await cluster.RbdAsync("namespace", "create", $"{CephCluster.Pool}/{nameSpace}");
        var image = $"{CephCluster.Pool}/{nameSpace}/{name}";
        await cluster.RbdAsync("create", "--size", "16M", image);

        // An image of the same name in the default namespace must not be the one written.
        var decoy = $"{CephCluster.Pool}/{name}";
        await cluster.RbdAsync("create", "--size", "16M", decoy);
        await using (var device = cluster.Open(image))
        {
            Assert.Equal(new RbdImageSpec(CephCluster.Pool, nameSpace, name, null), device.Image);
            await device.WriteAsync(4096, Patterns.Generate(4096, 65536, seed: 12), fua: true, CancellationToken.None);
        }

        var exported = await cluster.ExportAsync(image);
        Assert.True(Patterns.Generate(4096, 65536, seed: 12).AsSpan().SequenceEqual(exported.AsSpan(4096, 65536)));
        Assert.True((await cluster.ExportAsync(decoy)).AsSpan().IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact(Timeout = 120_000)]
    public async Task A_read_only_open_refuses_writes_with_EPERM_and_still_reads()
    {
        var image = await cluster.CreateImageAsync("readonly");
        await using (var writer = cluster.Open(image))
        {
            await writer.WriteAsync(0, Patterns.Generate(0, 8192, seed: 8), fua: true, CancellationToken.None);
        }

        await using var device = cluster.Open(image, readOnly: true);
        Assert.Equal(BlockDeviceFeatures.None, device.Features & (BlockDeviceFeatures.Write | BlockDeviceFeatures.Trim | BlockDeviceFeatures.WriteZeroes));
        var failure = Assert.Throws<BlockDeviceException>(() => device.WriteAsync(0, new byte[512], fua: false, CancellationToken.None));
        Assert.Equal(NbdError.NotPermitted, failure.Error);

        var read = new byte[8192];
        await device.ReadAsync(0, read, CancellationToken.None);
        Assert.True(Patterns.Generate(0, 8192, seed: 8).AsSpan().SequenceEqual(read));
    }

    [Fact(Timeout = 120_000)]
    public async Task A_snapshot_opens_read_only_and_reads_what_the_image_held_when_it_was_taken()
    {
        var image = await cluster.CreateImageAsync("snap");
        await using (var writer = cluster.Open(image))
        {
            await writer.WriteAsync(0, Patterns.Generate(0, 1 << 20, seed: 9), fua: true, CancellationToken.None);
        }

        await cluster.RbdAsync("snap", "create", image + "@before");
        await using (var writer = cluster.Open(image))
        {
            await writer.WriteAsync(0, Patterns.Generate(0, 1 << 20, seed: 10), fua: true, CancellationToken.None);
        }

        await using var snapshot = cluster.Open(image + "@before");
        Assert.True(snapshot.IsReadOnly);
        Assert.Equal(BlockDeviceFeatures.None, snapshot.Features & BlockDeviceFeatures.Write);
        Assert.Equal(NbdError.NotPermitted, Assert.Throws<BlockDeviceException>(() => snapshot.WriteZeroesAsync(0, 512, ZeroFlags.None, CancellationToken.None)).Error);
        var read = new byte[1 << 20];
        await snapshot.ReadAsync(0, read, CancellationToken.None);
        Assert.True(Patterns.Generate(0, 1 << 20, seed: 9).AsSpan().SequenceEqual(read), "the snapshot keeps the old data");
    }
}
