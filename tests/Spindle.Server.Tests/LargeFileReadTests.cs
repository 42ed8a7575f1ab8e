using Spindle.Protocol;
using Spindle.Server.Exports;
using Spindle.Storage;
using Spindle.Testing;
using Xunit;

namespace Spindle.Server.Tests;

/// <summary>Large reads of a file over TCP, interleaved with small ones, simple and structured: byte-exact.</summary>
public sealed class LargeFileReadTests
{
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Large_reads_of_a_file_are_byte_exact(bool structured)
    {
        using var directory = new TempDirectory();
        var path = directory.File("disk.img");
        var content = Patterns.Random(8 << 20, seed: 21);
        Array.Clear(content, 5 << 20, 1 << 20); // a zero run (still allocated: not a hole)
        await File.WriteAllBytesAsync(path, content);
        await using (var stream = new FileStream(path, FileMode.Open, FileAccess.Write))
        {
            stream.SetLength(12 << 20); // then a real hole up to 12 MiB
        }

        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "file" }, FileBlockDevice.Open(path, readOnly: false))), sockets: true);
        var (client, _, _) = await harness.OpenAsync("file", structured);
        await using var _1 = client;

        // Interleave large replies with small ones, several in flight, at unaligned offsets.
        var requests = new (ulong Offset, uint Length)[] { (0, 1 << 20), (4097, 700_000), (100, 4096), (3 << 20, 2 << 20), (7 << 20, 1 << 20), (11 << 20, 1 << 20) };
        for (var i = 0; i < requests.Length; i++)
        {
            await client.SendRequestAsync(NbdCommand.Read, (ulong)i, requests[i].Offset, requests[i].Length);
        }

        var expected = new byte[12 << 20];
        content.CopyTo(expected, 0);
        for (var received = 0; received < requests.Length; received++)
        {
            var first = await client.ReadReplyAsync(structured ? 0 : 0);
            var index = (int)first.Cookie;
            var (offset, length) = requests[index];
            byte[] data;
            if (structured)
            {
                var chunks = new List<RawReply> { first };
                while (!chunks[^1].IsDone)
                {
                    chunks.Add(await client.ReadReplyAsync());
                }

                data = RawNbdClient.Reassemble(chunks, offset, (int)length);
            }
            else
            {
                Assert.Equal(NbdError.None, first.Error);
                data = await client.ReadExactlyAsync((int)length);
            }

            Assert.True(expected.AsSpan((int)offset, (int)length).SequenceEqual(data), $"read {index} at {offset}+{length} differs");
        }
    }

    [Fact]
    public async Task A_file_truncated_under_the_server_reads_as_zeroes_past_its_end()
    {
        using var directory = new TempDirectory();
        var path = directory.File("disk.img");
        await File.WriteAllBytesAsync(path, Patterns.Random(4 << 20, seed: 3));
        await using var harness = new ServerHarness(addExports: c => c.Add(new Export(new ExportOptions { Name = "file" }, FileBlockDevice.Open(path, readOnly: false))), sockets: true);
        var (client, _, _) = await harness.OpenAsync("file", structured: false);
        await using var _1 = client;
        await using (var stream = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
        {
            stream.SetLength(1 << 20); // someone else truncates the image while it is served
        }

        await client.SendRequestAsync(NbdCommand.Read, 1, 512 << 10, 1 << 20);
        var reply = await client.ReadReplyAsync(1 << 20);
        Assert.Equal(NbdError.None, reply.Error);
        Assert.Equal(Patterns.Random(4 << 20, seed: 3)[(512 << 10)..(1 << 20)], reply.Payload[..(512 << 10)]);
        Assert.All(reply.Payload[(512 << 10)..], b => Assert.Equal(0, b));

        // And the stream is still in step.
        await TransmissionTests.AssertStillServesAsync(client);
    }
}
