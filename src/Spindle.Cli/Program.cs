using System.CommandLine;
using Spindle.Cli.Commands;
using Spindle.Cli.Hosting;

// Backends in their own assemblies (they bring native dependencies, loaded only when an export uses them).
BackendFactory.Register(RbdBackend.Kind, RbdBackend.Open);

// NBD URIs as sources of spindle mount and attach, through the client library.
NbdMountSource.Register();

var root = new RootCommand("Spindle: a network block device server and client speaking NBD (fixed newstyle).")
{
    ServeCommand.Create(),
    InfoCommand.Create(),
    CopyCommand.Create(),
    DumpCommand.Create(),
    MountCommand.Create(),
    AttachCommand.Create(),
    DetachCommand.Create(),
    CtlCommand.Create(),
    BitmapCommand.Create(),
};

// Hidden: the manual pages and bash completion, generated from this tree (scripts/install.sh).
root.Subcommands.Add(DocsCommand.Create(root));
root.Subcommands[^1].Hidden = true;

var configuration = new InvocationConfiguration
{
    // Signals are handled by the commands themselves (a graceful stop needs more than a cancelled token).
    ProcessTerminationTimeout = null,
};
return await root.Parse(args).InvokeAsync(configuration).ConfigureAwait(false);
