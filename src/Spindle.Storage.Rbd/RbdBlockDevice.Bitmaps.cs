using System.Globalization;
using Spindle.Protocol;
using Spindle.Storage.Layers;
using Spindle.Storage.Rbd.Native;

namespace Spindle.Storage.Rbd;

/// <summary>The dirty bitmaps of an RBD image, kept in the image's metadata (docs/bitmaps.md, "RBD images").</summary>
public sealed partial class RbdBlockDevice
{
    /// <summary>The metadata key prefix of every bitmap key.</summary>
    public const string BitmapKeyPrefix = "spindle-bitmap.";

    /// <summary>
    /// Opens bitmap <paramref name="name"/> from the image's metadata, creating it all clean (with
    /// <paramref name="granularity"/>, covering <paramref name="size"/> bytes) when it is missing. A damaged or
    /// hostile record is refused with an <see cref="InvalidDataException"/>.
    /// </summary>
    public DirtyBitmapStore OpenBitmap(string name, long granularity, long size)
    {
        if (!DirtyBitmapStore.IsValidName(name))
        {
            throw new ArgumentException($"'{name}' is not a valid bitmap name", nameof(name));
        }

        var key = BitmapKeyPrefix + name;
        var header = GetMetadata(key);
        if (header is null)
        {
            if (!DirtyBitmapStore.IsValidGranularity(granularity))
            {
                throw new ArgumentOutOfRangeException(nameof(granularity), $"the granularity {granularity} is not a power of two from 512 bytes to 1 GiB");
            }

            var store = new RbdBitmapStore(this, name, granularity, size);
            for (var page = 0L; page < store.PageCount; page++)
            {
                RemoveMetadata(store.PageKey(page)); // leftovers of a removed bitmap of the same name
            }

            SetMetadata(key, string.Create(CultureInfo.InvariantCulture, $"v1 {granularity} {size}"));
            return store;
        }

        // "v1 GRANULARITY SIZE", checked field by field before anything is believed.
        var words = header.Split(' ');
        if (words.Length != 3 || words[0] != "v1" ||
            !long.TryParse(words[1], NumberStyles.None, CultureInfo.InvariantCulture, out var storedGranularity) ||
            !long.TryParse(words[2], NumberStyles.None, CultureInfo.InvariantCulture, out var storedSize) ||
            !DirtyBitmapStore.IsValidGranularity(storedGranularity) || storedSize > long.MaxValue / 2)
        {
            throw new InvalidDataException($"bitmap '{name}' of {_description}: metadata key {key} holds '{Truncate(header)}', not 'v1 GRANULARITY SIZE'");
        }

        var opened = new RbdBitmapStore(this, name, storedGranularity, storedSize);
        if (opened.PageCount * DirtyBitmapStore.PageSize > DirtyBitmap.MaxBodyBytes)
        {
            throw new InvalidDataException($"bitmap '{name}' of {_description}: more than 1 GiB of bitmap");
        }

        return opened;
    }

    private static string Truncate(string text) => text.Length > 80 ? text[..80] + "..." : text;

    private unsafe string? GetMetadata(string key)
    {
        var buffer = new byte[8192];
        for (var attempt = 0; attempt < 3; attempt++)
        {
            var length = (nuint)buffer.Length;
            int result;
            fixed (byte* pointer = buffer)
            {
                result = LibRbd.MetadataGet(_image, key, pointer, ref length);
            }

            if (result == -Errno.ENOENT)
            {
                return null;
            }

            if (result == -Errno.ERANGE && length > (nuint)buffer.Length && length <= 1 << 20)
            {
                buffer = new byte[(int)length];
                continue;
            }

            if (result < 0)
            {
                throw new IOException($"{_description}: reading metadata key {key}: {RbdErrors.Describe(-result)}");
            }

            var text = buffer.AsSpan(0, (int)Math.Min(length, (nuint)buffer.Length));
            var end = text.IndexOf((byte)0);
            return System.Text.Encoding.UTF8.GetString(end < 0 ? text : text[..end]);
        }

        throw new InvalidDataException($"{_description}: metadata key {key} is too long");
    }

    private void SetMetadata(string key, string value)
    {
        var result = LibRbd.MetadataSet(_image, key, value);
        if (result < 0)
        {
            throw new BlockDeviceException(RbdErrors.ToNbdError(-result), $"{_description}: writing metadata key {key}: {RbdErrors.Describe(-result)}");
        }
    }

    private void RemoveMetadata(string key)
    {
        var result = LibRbd.MetadataRemove(_image, key);
        if (result < 0 && result != -Errno.ENOENT)
        {
            throw new BlockDeviceException(RbdErrors.ToNbdError(-result), $"{_description}: removing metadata key {key}: {RbdErrors.Describe(-result)}");
        }
    }

    /// <summary>
    /// A bitmap in image metadata: its header under <c>spindle-bitmap.NAME</c> ("v1 GRANULARITY SIZE") and each page
    /// with a bit set under <c>spindle-bitmap.NAME.N</c> (base64 of its 4096 bytes; a missing page is all clean).
    /// rbd_metadata_set returns once the OSDs have the value, so each page write is durable by itself and
    /// <see cref="Sync"/> has nothing left to do.
    /// </summary>
    private sealed class RbdBitmapStore(RbdBlockDevice device, string name, long granularity, long size) : DirtyBitmapStore
    {
        public override string Name => name;

        public override long Granularity => granularity;

        public override long ImageSize => size;

        public string PageKey(long page) => string.Create(CultureInfo.InvariantCulture, $"{BitmapKeyPrefix}{name}.{page}");

        public override void Load(Span<byte> destination)
        {
            for (var page = 0L; page < PageCount; page++)
            {
                var target = destination.Slice((int)(page * PageSize), PageSize);
                target.Clear();
                var value = device.GetMetadata(PageKey(page));
                if (value is not null && (!Convert.TryFromBase64String(value, target, out var written) || written != PageSize))
                {
                    throw new InvalidDataException($"bitmap '{name}' of {device._description}: metadata key {PageKey(page)} is not a base64 page of {PageSize} bytes");
                }
            }
        }

        public override void WritePage(long page, ReadOnlySpan<byte> data) => device.SetMetadata(PageKey(page), Convert.ToBase64String(data[..PageSize]));

        public override void Sync()
        {
        }
    }
}
