using System.IO.Compression;
using System.Xml.Linq;
using Spindle.Testing;
using Xunit;

namespace Spindle.Ops.Tests;

/// <summary>
/// The NuGet packages as a user gets them: from a local feed (scripts/test.sh packs them into artifacts/packages and
/// sets <c>SPINDLE_PACKAGES</c>; run alone, the test packs the build it belongs to), the client library referenced
/// by a fresh project that talks to a server, and the CLI installed with <c>dotnet tool install</c>.
/// </summary>
public sealed class PackageTests
{
    private const string Version = "0.1.0";

    private static readonly string[] Libraries = ["Spindle.Protocol", "Spindle.Wire", "Spindle.Storage", "Spindle.Client"];

    private const string Consumer = """
        using Spindle.Client;

        // Writes a pattern through the packaged client, reads it back, and prints what it saw.
        await using var client = await NbdClient.ConnectAsync(args[0]);
        var pattern = new byte[65536];
        Array.Fill(pattern, (byte)0x5a);
        await client.WriteAsync(4096, pattern);
        await client.FlushAsync();
        var back = new byte[pattern.Length];
        await client.ReadAsync(4096, back);
        Console.WriteLine($"size {client.Size} same {back.AsSpan().SequenceEqual(pattern)}");
        """;

    [Fact]
    public async Task The_client_package_builds_a_fresh_project_and_the_tool_package_installs_from_a_local_feed()
    {
        using var work = new TempDirectory();
        var feed = await FeedAsync(work);

        // Metadata: each library carries its README and XML docs; the client depends on the packages it stands on.
        foreach (var library in Libraries)
        {
            var package = Path.Combine(feed, $"{library}.{Version}.nupkg");
            Assert.True(File.Exists(package), $"{package} was not packed");
            using var zip = ZipFile.OpenRead(package);
            Assert.Contains(zip.Entries, e => e.FullName == "README.md");
            Assert.Contains(zip.Entries, e => e.FullName == $"lib/net10.0/{library}.dll");
            Assert.Contains(zip.Entries, e => e.FullName == $"lib/net10.0/{library}.xml");
            var nuspec = Nuspec(zip);
            Assert.False(string.IsNullOrWhiteSpace(Element(nuspec, "description")), $"{library}: no description");
            Assert.Equal("README.md", Element(nuspec, "readme"));
            if (library == "Spindle.Client")
            {
                var dependencies = nuspec.Descendants().Where(e => e.Name.LocalName == "dependency").Select(e => (string?)e.Attribute("id")).ToList();
                Assert.Contains("Spindle.Protocol", dependencies);
                Assert.Contains("Spindle.Wire", dependencies);
                Assert.Contains("Spindle.Storage", dependencies);
            }
        }

        using (var tool = ZipFile.OpenRead(Path.Combine(feed, $"Spindle.Cli.{Version}.nupkg")))
        {
            Assert.Contains(tool.Entries, e => e.FullName.EndsWith("DotnetToolSettings.xml", StringComparison.Ordinal));
            Assert.Contains(Nuspec(tool).Descendants(), e => e.Name.LocalName == "packageType" && (string?)e.Attribute("name") == "DotnetTool");
        }

        // A private package cache, so an older Spindle.* 0.1.0 cached by an earlier run is never what gets used.
        var environment = new Dictionary<string, string>
        {
            ["NUGET_PACKAGES"] = work.File("nuget-cache"),
            ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1",
            ["DOTNET_NOLOGO"] = "1",
            ["DOTNET_SKIP_FIRST_TIME_EXPERIENCE"] = "1",
        };
        var project = Directory.CreateDirectory(work.File("consumer")).FullName;
        await File.WriteAllTextAsync(Path.Combine(project, "nuget.config"), $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources>
                <add key="spindle-local" value="{feed}" />
              </packageSources>
            </configuration>
            """, TestContext.Current.CancellationToken);
        await File.WriteAllTextAsync(Path.Combine(project, "Consumer.csproj"), $"""
            <Project Sdk="Microsoft.NET.Sdk">
              <PropertyGroup>
                <OutputType>Exe</OutputType>
                <TargetFramework>net10.0</TargetFramework>
                <ImplicitUsings>enable</ImplicitUsings>
                <Nullable>enable</Nullable>
                <TreatWarningsAsErrors>true</TreatWarningsAsErrors>
                <ManagePackageVersionsCentrally>false</ManagePackageVersionsCentrally>
              </PropertyGroup>
              <ItemGroup>
                <PackageReference Include="Spindle.Client" Version="{Version}" />
              </ItemGroup>
            </Project>
            """, TestContext.Current.CancellationToken);
        await File.WriteAllTextAsync(Path.Combine(project, "Program.cs"), Consumer, TestContext.Current.CancellationToken);
        // Outside the repository: its Directory.Build.props and Directory.Packages.props must not apply.
        Assert.False(File.Exists(Path.Combine(Path.GetDirectoryName(work.Path)!, "Directory.Build.props")));

        await using var server = await OpsServer.StartAsync("[disk]\n    exportname = $DIR/disk.img\n    filesize = 8M\n", control: false);
        var build = await PeerTool.RunAsync("dotnet", ["build", project, "-c", "Release", "-nologo", "-v", "quiet", "-o", Path.Combine(project, "out")],
            TimeSpan.FromMinutes(5), environment: environment, workingDirectory: project);
        Assert.True(build.ExitCode == 0, build.ToString());
        var run = await PeerTool.RunAsync(Path.Combine(project, "out", "Consumer"), [server.Uri("disk")], TimeSpan.FromMinutes(1), environment: environment);
        Assert.True(run.ExitCode == 0, run.ToString());
        Assert.Equal("size 8388608 same True", run.StandardOutput.Trim());

        // The bytes it wrote are there for an independent reader.
        await PeerTool.RunCheckedAsync("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x5a 4096 64k", "-c", "read -P 0 0 4096", server.Uri("disk")]);

        // The dotnet tool: installed from the feed, it is the spindle command.
        var tools = work.File("tools");
        var install = await PeerTool.RunAsync("dotnet", ["tool", "install", "Spindle.Cli", "--version", Version, "--tool-path", tools, "--add-source", feed],
            TimeSpan.FromMinutes(5), environment: environment, workingDirectory: project);
        Assert.True(install.ExitCode == 0, install.ToString());
        var version = await PeerTool.RunAsync(Path.Combine(tools, "spindle"), ["--version"], TimeSpan.FromMinutes(1), environment: environment);
        Assert.True(version.ExitCode == 0, version.ToString());
        Assert.StartsWith(Version, version.StandardOutput.Trim(), StringComparison.Ordinal);
        var size = await PeerTool.RunAsync(Path.Combine(tools, "spindle"), ["info", "--size", server.Uri("disk")], TimeSpan.FromMinutes(1), environment: environment);
        Assert.True(size.ExitCode == 0, size.ToString());
        Assert.Equal("8388608", size.StandardOutput.Trim());
        Assert.Equal(0, await server.StopAsync());
    }

    /// <summary>The local feed: scripts/test.sh's, or the packages of this build packed into <paramref name="work"/>.</summary>
    private static async Task<string> FeedAsync(TempDirectory work)
    {
        if (Environment.GetEnvironmentVariable("SPINDLE_PACKAGES") is { Length: > 0 } packed)
        {
            return Path.GetFullPath(packed);
        }

        // bin/CONFIGURATION/FRAMEWORK: pack what this configuration built (the test's project references build it).
        var configuration = new DirectoryInfo(AppContext.BaseDirectory.TrimEnd('/')).Parent?.Name ?? "Release";
        var feed = work.File("feed");
        foreach (var project in Libraries.Append("Spindle.Cli"))
        {
            var csproj = Path.Combine(TestCertificates.RepositoryRoot(), "src", project, project + ".csproj");
            var pack = await PeerTool.RunAsync("dotnet", ["pack", csproj, "-c", configuration, "--no-build", "-nologo", "-v", "quiet", "-o", feed], TimeSpan.FromMinutes(5));
            Assert.True(pack.ExitCode == 0, pack.ToString());
        }

        return feed;
    }

    private static XElement Nuspec(ZipArchive zip)
    {
        var entry = zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal) && !e.FullName.Contains('/', StringComparison.Ordinal));
        using var stream = entry.Open();
        return XElement.Load(stream);
    }

    private static string? Element(XElement nuspec, string name) => nuspec.Descendants().FirstOrDefault(e => e.Name.LocalName == name)?.Value;
}
