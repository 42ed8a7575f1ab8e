namespace Spindle.Bench;

/// <summary>
/// Which file each server serves: the prepared image, or for an <see cref="ImageSpec.CopyPerServer"/> image a copy of
/// its own (<c>SERVER.served</c> in the work directory), replaced by a fresh copy before a run that writes and before
/// the first run after one, and checked once the server has stopped after writing.
/// </summary>
internal sealed class ServedImages(string work, IReadOnlyDictionary<string, string> prepared)
{
    /// <summary>Servers whose copy was written since it was made.</summary>
    private readonly HashSet<string> _written = new(StringComparer.Ordinal);

    /// <summary>The file <paramref name="server"/> serves, copied from the prepared image the first time when the variant wants a copy.</summary>
    public string For(ServerUnderTest server, ServerVariant variant)
    {
        var image = prepared[variant.Image.Key];
        if (!variant.Image.CopyPerServer)
        {
            return image;
        }

        var copy = CopyPath(server);
        if (!File.Exists(copy))
        {
            File.Copy(image, copy);
            variant.Image.Renewed?.Invoke(copy);
        }

        return copy;
    }

    /// <summary>
    /// Before a run: a server serving a copy gets a fresh one if the run writes (allocating writes are measured as
    /// such) or the last run wrote (reads meet the image as prepared). The server is stopped first; the caller's
    /// restart starts it on the new copy.
    /// </summary>
    public async Task RefreshAsync(ServerUnderTest server, ServerVariant variant, bool writes)
    {
        if (!variant.Image.CopyPerServer || !(writes || _written.Remove(server.Name)))
        {
            return;
        }

        await server.StopAsync();
        File.Copy(prepared[variant.Image.Key], CopyPath(server), overwrite: true);
        variant.Image.Renewed?.Invoke(CopyPath(server));
    }

    /// <summary>
    /// After a run that wrote: the copy is marked for replacement and, when the image has a check, the server is
    /// stopped and the copy checked (the verdict printed; a damaged image throws and ends the benchmark).
    /// </summary>
    public async Task WrittenAsync(ServerUnderTest server, ServerVariant variant)
    {
        if (!variant.Image.CopyPerServer)
        {
            return;
        }

        _written.Add(server.Name);
        if (variant.Image.CheckAsync is { } check)
        {
            await server.StopAsync();
            Console.WriteLine($"bench: {server.Name}: {await check(CopyPath(server))}");
        }
    }

    private string CopyPath(ServerUnderTest server) => Path.Combine(work, server.Name + ".served");
}
