using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using Spindle.Client;
using Spindle.Protocol;

namespace Spindle.Cli.Commands;

/// <summary><c>spindle info</c>: what an NBD server says about an export, its list of exports, or an allocation map.</summary>
internal static class InfoCommand
{
    private const string Examples = """
        Show what an NBD server says about an export: size, flags, block sizes, protocol features.

        Examples:
          spindle info nbd://localhost/disk                the export "disk" on port 10809
          spindle info nbd+unix:///?socket=/run/nbd.sock   the default export on a Unix socket
          spindle info --list nbd://server                 every export the server lists
          spindle info --map nbd://localhost/disk          allocation: data, hole and zero runs
          spindle info --context qemu:dirty-bitmap:b URI   the map of another metadata context
          spindle info --json nbd://localhost              for scripts (nbdinfo's keys: jq filters carry over)
          spindle info --size nbd://localhost/disk         the size in bytes, alone
          spindle info --can trim nbd://localhost/disk     exit status 0 if it can, 2 if not (as nbdinfo)
          spindle info --is read-only nbd://localhost/disk

          spindle info 'nbds://server/disk?tls-certificates=/etc/pki/nbd'   over TLS

        URIs follow the NBD URI spec (nbd://host[:port]/export, nbd+unix:///export?socket=PATH), the same
        strings qemu and nbdinfo take. nbds:// and nbds+unix:// use TLS and never fall back to plain text:
        tls-certificates=DIR names ca-cert.pem (the server's CA; default: the system's) and, for servers that
        verify clients, client-cert.pem and client-key.pem; tls-hostname=NAME the name the server's certificate
        must carry (default: the URI's host); tls-verify-peer=0 skips checking the server. nbd:// never uses TLS.
        """;

    /// <summary>The flag names shown, in nbdinfo's order and spelling (can_*, is_*).</summary>
    private static readonly (string Name, Func<ExportInfo, bool> Test)[] FlagTable =
    [
        ("is_rotational", e => e.IsRotational),
        ("is_read_only", e => e.IsReadOnly),
        ("can_block_status", e => e.CanBlockStatus),
        ("can_cache", e => e.CanCache),
        ("can_df", e => e.CanDontFragment),
        ("can_fast_zero", e => e.CanFastZero),
        ("can_flush", e => e.CanFlush),
        ("can_fua", e => e.CanFua),
        ("can_multi_conn", e => e.CanMultiConn),
        ("can_trim", e => e.CanTrim),
        ("can_zero", e => e.CanWriteZeroes),
    ];

    public static Command Create()
    {
        var uri = new Argument<string>("uri") { Description = "The NBD URI of the export (or of the server, with --list)." };
        var list = new Option<bool>("--list", "-L") { Description = "List the server's exports (NBD_OPT_LIST) with their details." };
        var map = new Option<bool>("--map") { Description = "Print the allocation map (BLOCK_STATUS): runs of data, holes and zeroes." };
        var context = new Option<string?>("--context") { Description = "With --map: the metadata context to map [default: base:allocation]; implies --map." };
        var json = new Option<bool>("--json") { Description = "Print JSON instead of text, with nbdinfo's keys." };
        var size = new Option<bool>("--size") { Description = "Print only the export's size in bytes (as nbdinfo --size)." };
        var can = new Option<string?>("--can")
        {
            Description = "Exit 0 if the export can FEATURE, 2 if not, 1 on error (nbdinfo's names: connect, read, write, tls, structured, flush, fua, trim, zero, fast-zero, df, cache, multi-conn, block-status, extended).",
            HelpName = "FEATURE",
        };
        var isOption = new Option<string?>("--is") { Description = "Exit 0 if the export is FEATURE (read-only, rotational, tls...), 2 if not, 1 on error.", HelpName = "FEATURE" };
        var deadTimeout = ClientCommandSupport.DeadTimeoutOption();
        var command = new Command("info", Examples) { uri, list, map, context, json, size, can, isOption, deadTimeout };
        command.SetAction((parse, cancellationToken) => ClientCommandSupport.RunAsync(async () =>
        {
            var target = NbdUri.Parse(parse.GetValue(uri)!);
            var dead = ClientCommandSupport.ParseDeadTimeout(parse.GetValue(deadTimeout));
            var asJson = parse.GetValue(json);
            var output = Console.Out;
            var mapContext = parse.GetValue(context);
            var mapping = parse.GetValue(map) || mapContext is not null;
            if ((parse.GetValue(can) ?? parse.GetValue(isOption)) is { } feature)
            {
                return await InfoFeatures.CanAsync(target, feature, dead, cancellationToken).ConfigureAwait(false);
            }

            if (parse.GetValue(size))
            {
                var sized = await NbdClient.ConnectAsync(target, ClientCommandSupport.Options(deadTimeout: dead), cancellationToken).ConfigureAwait(false);
                await using (sized.ConfigureAwait(false))
                {
                    output.WriteLine(sized.Size.ToString(CultureInfo.InvariantCulture));
                }

                return 0;
            }

            if (parse.GetValue(list))
            {
                if (mapping)
                {
                    throw new FormatException("--list and --map cannot be combined");
                }

                var listings = await NbdClient.ListExportsAsync(target, ClientCommandSupport.Options(listContexts: true, deadTimeout: dead), cancellationToken).ConfigureAwait(false);
                if (asJson)
                {
                    WriteListJson(output, target, listings);
                }
                else
                {
                    WriteListText(output, target, listings);
                }

                return 0;
            }

            if (mapping)
            {
                var contextName = mapContext ?? MetaContexts.BaseAllocation;
                var client = await NbdClient.ConnectAsync(target, ClientCommandSupport.Options(context: contextName, deadTimeout: dead), cancellationToken).ConfigureAwait(false);
                await using (client.ConfigureAwait(false))
                {
                    var runs = await MapAsync(client, contextName, cancellationToken).ConfigureAwait(false);
                    if (asJson)
                    {
                        WriteMapJson(output, contextName, runs);
                    }
                    else
                    {
                        WriteMapText(output, contextName, runs);
                    }
                }

                return 0;
            }

            var connected = await NbdClient.ConnectAsync(target, ClientCommandSupport.Options(listContexts: true, deadTimeout: dead), cancellationToken).ConfigureAwait(false);
            await using (connected.ConfigureAwait(false))
            {
                if (asJson)
                {
                    var content = await InfoFeatures.ContentAsync(connected, cancellationToken).ConfigureAwait(false);
                    WriteInfoJson(output, target, connected.Export, content);
                }
                else
                {
                    WriteInfoText(output, target, connected.Export);
                }
            }

            return 0;
        }, cancellationToken));
        return command;
    }

    /// <summary>The whole export's extents in <paramref name="context"/>, neighbours with equal status merged.</summary>
    internal static async Task<List<NbdExtent>> MapAsync(NbdClient client, string context, CancellationToken cancellationToken)
    {
        var runs = new List<NbdExtent>();
        await foreach (var extent in client.GetExtentsAsync(0, client.Size, context, cancellationToken).ConfigureAwait(false))
        {
            if (runs.Count > 0 && runs[^1].Flags == extent.Flags && runs[^1].End == extent.Offset)
            {
                runs[^1] = runs[^1] with { Length = runs[^1].Length + extent.Length };
            }
            else
            {
                runs.Add(extent);
            }
        }

        return runs;
    }

    /// <summary>How a status of <paramref name="context"/> reads: nbdinfo's words for the contexts it knows.</summary>
    internal static string Describe(string context, uint flags)
    {
        if (context == MetaContexts.BaseAllocation)
        {
            return new NbdExtent(0, 0, flags).AllocationDescription;
        }

        if (context.StartsWith(MetaContexts.DirtyBitmapPrefix, StringComparison.Ordinal))
        {
            return (flags & 1) != 0 ? "dirty" : "clean";
        }

        if (context == "qemu:allocation-depth")
        {
            return flags switch
            {
                0 => "unallocated",
                1 => "local",
                _ => string.Create(CultureInfo.InvariantCulture, $"backing depth {flags}"),
            };
        }

        return string.Empty;
    }

    private static void WriteInfoText(TextWriter output, NbdUri uri, ExportInfo export)
    {
        output.WriteLine($"protocol: {Protocol(export)}");
        output.WriteLine($"export=\"{export.Name}\":");
        output.WriteLine($"\texport-size: {export.Size} ({ClientCommandSupport.Human(export.Size)})");
        if (export.CanonicalName is { } canonical && canonical != export.Name)
        {
            output.WriteLine($"\tcanonical-name: \"{canonical}\"");
        }

        if (!string.IsNullOrEmpty(export.Description))
        {
            output.WriteLine($"\tdescription: {export.Description}");
        }

        output.WriteLine($"\turi: {uri}");
        if (export.AvailableMetaContexts is { } available)
        {
            output.WriteLine("\tcontexts:");
            foreach (var context in available)
            {
                output.WriteLine($"\t\t{context}");
            }
        }

        foreach (var (name, test) in FlagTable)
        {
            output.WriteLine($"\t{name}: {(test(export) ? "true" : "false")}");
        }

        if (export.AdvertisedBlockSizes is { } sizes)
        {
            output.WriteLine($"\tblock_size_minimum: {sizes.Minimum}");
            output.WriteLine($"\tblock_size_preferred: {sizes.Preferred}");
            output.WriteLine($"\tblock_size_maximum: {sizes.Maximum}");
        }
        else
        {
            output.WriteLine("\tblock sizes: not advertised (the client assumes minimum 1, preferred 4096, maximum 32 MiB)");
        }

        output.WriteLine($"\ttransmission_flags: 0x{(ushort)export.RawFlags:x4}");
    }

    private static string Protocol(ExportInfo export)
    {
        var handshake = export.FixedNewstyle ? "newstyle-fixed" : "newstyle";
        var replies = export.ExtendedHeaders ? "extended headers (64-bit)" : export.StructuredReplies ? "structured replies" : "simple replies";
        var method = export.Method == NegotiationMethod.Go ? "NBD_OPT_GO" : "NBD_OPT_EXPORT_NAME";
        return $"{handshake} {(export.Tls ? "with" : "without")} TLS, {replies}, entered with {method}";
    }

    /// <summary>
    /// nbdinfo's JSON (libnbd info/show.c): protocol, TLS, structured, extended, and an "exports" array whose objects
    /// carry nbdinfo's keys in nbdinfo's order, so jq filters written for nbdinfo read Spindle's output unchanged.
    /// What nbdinfo does not show sits under each export's "spindle" object.
    /// </summary>
    private static void WriteInfoJson(TextWriter output, NbdUri uri, ExportInfo export, string? content) =>
        WriteJson(output, writer =>
        {
            writer.WriteStartObject();
            WriteProtocolJson(writer, export);
            writer.WriteStartArray("exports");
            WriteExportJson(writer, export, uri.ToString(), export.Description, content);
            writer.WriteEndArray();
            writer.WriteEndObject();
        });

    private static void WriteProtocolJson(Utf8JsonWriter writer, ExportInfo export)
    {
        writer.WriteString("protocol", export.FixedNewstyle ? "newstyle-fixed" : "newstyle");
        writer.WriteBoolean("TLS", export.Tls);
        writer.WriteBoolean("structured", export.StructuredReplies);
        writer.WriteBoolean("extended", export.ExtendedHeaders);
    }

    private static void WriteExportJson(Utf8JsonWriter writer, ExportInfo export, string uri, string? description, string? content)
    {
        writer.WriteStartObject();
        writer.WriteString("export-name", export.CanonicalName ?? export.Name);
        if (!string.IsNullOrEmpty(description))
        {
            writer.WriteString("description", description);
        }

        if (content is not null)
        {
            writer.WriteString("content", content);
        }

        writer.WriteString("uri", uri);
        if (export.AvailableMetaContexts is { } available)
        {
            writer.WriteStartArray("contexts");
            foreach (var context in available)
            {
                writer.WriteStringValue(context);
            }

            writer.WriteEndArray();
        }

        foreach (var (name, test) in FlagTable.Where(flag => flag.Name != "can_block_status"))
        {
            writer.WriteBoolean(name, test(export));
        }

        if (export.AdvertisedBlockSizes is { } sizes)
        {
            writer.WriteNumber("block_size_minimum", sizes.Minimum);
            writer.WriteNumber("block_size_preferred", sizes.Preferred);
            writer.WriteNumber("block_size_maximum", sizes.Maximum);
        }

        writer.WriteNumber("export-size", export.Size);
        writer.WriteString("export-size-str", InfoFeatures.HumanSize(export.Size));
        writer.WriteStartObject("spindle");
        writer.WriteString("name", export.Name);
        writer.WriteString("method", export.Method == NegotiationMethod.Go ? "go" : "export-name");
        writer.WriteBoolean("no_zeroes", (export.HandshakeFlags & HandshakeFlags.NoZeroes) != 0);
        writer.WriteNumber("transmission_flags", (ushort)export.RawFlags);
        writer.WriteBoolean("can_block_status", export.CanBlockStatus);
        writer.WriteNumber("max_payload", export.MaximumPayload);
        writer.WriteStartArray("meta_contexts");
        foreach (var context in export.MetaContexts.Keys.Order(StringComparer.Ordinal))
        {
            writer.WriteStringValue(context);
        }

        writer.WriteEndArray();
        writer.WriteEndObject();
        writer.WriteEndObject();
    }

    private static void WriteListText(TextWriter output, NbdUri uri, IReadOnlyList<ExportListing> listings)
    {
        output.WriteLine($"server: {uri.Target}, {listings.Count} export{(listings.Count == 1 ? "" : "s")}");
        foreach (var listing in listings)
        {
            output.WriteLine($"export=\"{listing.Name}\":");
            if (!string.IsNullOrEmpty(listing.Description))
            {
                output.WriteLine($"\tdescription: {listing.Description}");
            }

            output.WriteLine($"\turi: {uri.WithExportName(listing.Name)}");
            if (listing.Info is { } info)
            {
                output.WriteLine($"\texport-size: {info.Size} ({ClientCommandSupport.Human(info.Size)})");
                output.WriteLine($"\tis_read_only: {(info.IsReadOnly ? "true" : "false")}");
                output.WriteLine($"\tcan_multi_conn: {(info.CanMultiConn ? "true" : "false")}");
            }
            else if (listing.InfoError is not null)
            {
                output.WriteLine($"\tdetails unavailable: {listing.InfoError}");
            }
        }
    }

    /// <summary>nbdinfo --list --json: the same shape, one object per export that could be described.</summary>
    private static void WriteListJson(TextWriter output, NbdUri uri, IReadOnlyList<ExportListing> listings)
    {
        foreach (var failed in listings.Where(listing => listing.Info is null))
        {
            Console.Error.WriteLine($"spindle: export '{failed.Name}': {failed.InfoError}");
        }

        WriteJson(output, writer =>
        {
            writer.WriteStartObject();
            if (listings.FirstOrDefault(listing => listing.Info is not null)?.Info is { } first)
            {
                WriteProtocolJson(writer, first);
            }

            writer.WriteStartArray("exports");
            foreach (var listing in listings.Where(listing => listing.Info is not null))
            {
                WriteExportJson(writer, listing.Info!, uri.WithExportName(listing.Name).ToString(), listing.Description ?? listing.Info!.Description, content: null);
            }

            writer.WriteEndArray();
            writer.WriteEndObject();
        });
    }

    private static void WriteMapText(TextWriter output, string context, List<NbdExtent> runs)
    {
        foreach (var run in runs)
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{run.Offset,20} {run.Length,20} {run.Flags,5}  {Describe(context, run.Flags)}"));
        }
    }

    private static void WriteMapJson(TextWriter output, string context, List<NbdExtent> runs)
    {
        WriteJson(output, writer =>
        {
            writer.WriteStartArray();
            foreach (var run in runs)
            {
                writer.WriteStartObject();
                writer.WriteNumber("offset", run.Offset);
                writer.WriteNumber("length", run.Length);
                writer.WriteNumber("type", run.Flags);
                writer.WriteString("description", Describe(context, run.Flags));
                writer.WriteEndObject();
            }

            writer.WriteEndArray();
        });
    }

    internal static void WriteJson(TextWriter output, Action<Utf8JsonWriter> write)
    {
        using var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            write(writer);
        }

        output.WriteLine(System.Text.Encoding.UTF8.GetString(stream.ToArray()));
        output.Flush();
    }
}
