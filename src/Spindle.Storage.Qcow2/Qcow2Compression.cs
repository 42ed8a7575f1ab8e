using System.IO.Compression;
using ZstdSharp;

namespace Spindle.Storage.Qcow2;

/// <summary>
/// Decompression of compressed clusters (qcow2.txt "Compressed Clusters Descriptor", header field compression_type):
/// type 0 is raw deflate (zlib without header, as qemu writes it), type 1 is a zstd frame. Decompression stops when
/// it has produced one cluster: the input may run on into the next compressed cluster's bytes.
/// </summary>
internal static class Qcow2Compression
{
    public const byte Zlib = 0;
    public const byte Zstd = 1;

    /// <summary>Fills <paramref name="cluster"/> from <paramref name="compressed"/>; false when the data is invalid or short.</summary>
    public static bool TryDecompress(byte type, byte[] compressed, int compressedLength, Span<byte> cluster)
    {
        try
        {
            using var input = new MemoryStream(compressed, 0, compressedLength, writable: false);
            using Stream decoder = type == Zstd ? new DecompressionStream(input) : new DeflateStream(input, CompressionMode.Decompress);
            var done = 0;
            while (done < cluster.Length)
            {
                var read = decoder.Read(cluster[done..]);
                if (read == 0)
                {
                    return false;
                }

                done += read;
            }

            return true;
        }
        catch (Exception exception) when (exception is InvalidDataException or ZstdException or IOException or InvalidOperationException)
        {
            return false;
        }
    }
}
