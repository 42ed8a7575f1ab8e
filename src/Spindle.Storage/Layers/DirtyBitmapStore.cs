namespace Spindle.Storage.Layers;

/// <summary>
/// Where one dirty bitmap is kept between runs (issue 14): a file beside an image, a file in a state directory for a
/// block device, or (in tests) memory. The store is page-based so a backend may keep it wherever pages fit: the
/// bitmap layer says "these <see cref="PageSize"/> bytes of the bitmap are now X" with <see cref="WritePage"/>, then
/// "make every page written so far durable" with <see cref="Sync"/>, and acknowledges no request that set a bit in
/// such a page before <see cref="Sync"/> returned. Bits are only ever set while a server runs, so every page written
/// is a superset of the one on disk: a torn page write can lose only bits whose request was not yet acknowledged.
/// </summary>
/// <remarks>
/// The body is the bitmap as qemu lays it out: bit <c>i</c> covers bytes [i * granularity, (i + 1) * granularity)
/// of the image, and sits in byte <c>i / 8</c> at bit <c>i % 8</c> (least significant first).
/// </remarks>
public abstract class DirtyBitmapStore : IDisposable
{
    /// <summary>The unit of <see cref="WritePage"/>: 4 KiB, one file system block, covering 32768 bits.</summary>
    public const int PageSize = 4096;

    /// <summary>The bitmap's name: its metadata context is <c>qemu:dirty-bitmap:NAME</c>.</summary>
    public abstract string Name { get; }

    /// <summary>Bytes of the image one bit covers: a power of two, 512 or more.</summary>
    public abstract long Granularity { get; }

    /// <summary>The size of the image (or partition) the bitmap describes.</summary>
    public abstract long ImageSize { get; }

    /// <summary>How many bits the bitmap has: the image size divided by the granularity, rounded up.</summary>
    public long BitCount => (ImageSize + Granularity - 1) / Granularity;

    /// <summary>How many pages the body has.</summary>
    public long PageCount => (BitCount + (PageSize * 8) - 1) / (PageSize * 8);

    /// <summary>Reads the whole body into <paramref name="destination"/> (<see cref="PageCount"/> pages).</summary>
    public abstract void Load(Span<byte> destination);

    /// <summary>Writes page <paramref name="page"/> of the body (not yet durable: see <see cref="Sync"/>).</summary>
    public abstract void WritePage(long page, ReadOnlySpan<byte> data);

    /// <summary>Makes every page written so far durable; throws (an <see cref="IOException"/> or a <see cref="BlockDeviceException"/>) when it cannot.</summary>
    public abstract void Sync();

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }

    /// <summary>Checks a granularity: a power of two from 512 bytes to 1 GiB.</summary>
    public static bool IsValidGranularity(long granularity) =>
        granularity is >= 512 and <= 1L << 30 && (granularity & (granularity - 1)) == 0;

    /// <summary>
    /// Checks a bitmap name: 1 to 64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit, so the
    /// name is safe in a file name and in a metadata context name.
    /// </summary>
    public static bool IsValidName(string? name)
    {
        if (string.IsNullOrEmpty(name) || name.Length > 64 || !char.IsAsciiLetterOrDigit(name[0]))
        {
            return false;
        }

        foreach (var c in name)
        {
            if (!char.IsAsciiLetterOrDigit(c) && c is not ('.' or '_' or '+' or '-'))
            {
                return false;
            }
        }

        return true;
    }
}

/// <summary>
/// A bitmap kept in memory (tests, and exports with nothing to persist to). It keeps the last durable copy apart from
/// the pages written since, so a test can see exactly what a crash would leave.
/// </summary>
public sealed class MemoryBitmapStore : DirtyBitmapStore
{
    private readonly Lock _gate = new();
    private readonly byte[] _written;
    private readonly byte[] _durable;

    public MemoryBitmapStore(string name, long granularity, long imageSize)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(imageSize);
        if (!IsValidGranularity(granularity))
        {
            throw new ArgumentOutOfRangeException(nameof(granularity), "the granularity must be a power of two from 512 bytes to 1 GiB");
        }

        Name = name;
        Granularity = granularity;
        ImageSize = imageSize;
        _written = new byte[PageCount * PageSize];
        _durable = new byte[_written.Length];
    }

    public override string Name { get; }

    public override long Granularity { get; }

    public override long ImageSize { get; }

    /// <summary>How many times <see cref="Sync"/> ran.</summary>
    public int Syncs { get; private set; }

    /// <summary>Called inside <see cref="Sync"/> before it makes the pages durable (a test holds it there, or fails it).</summary>
    public Action? BeforeSync { get; set; }

    /// <summary>Whether bit <paramref name="bit"/> is durable: what a crash now would leave.</summary>
    public bool IsDurable(long bit)
    {
        lock (_gate)
        {
            return (_durable[bit >> 3] & (1 << (int)(bit & 7))) != 0;
        }
    }

    public override void Load(Span<byte> destination)
    {
        lock (_gate)
        {
            _durable.CopyTo(destination);
        }
    }

    public override void WritePage(long page, ReadOnlySpan<byte> data)
    {
        lock (_gate)
        {
            data.CopyTo(_written.AsSpan(checked((int)(page * PageSize)), PageSize));
        }
    }

    public override void Sync()
    {
        BeforeSync?.Invoke();
        lock (_gate)
        {
            _written.CopyTo(_durable, 0);
            Syncs++;
        }
    }
}
