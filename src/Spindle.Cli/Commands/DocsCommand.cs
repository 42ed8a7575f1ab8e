using System.CommandLine;
using System.Globalization;
using System.Text;

namespace Spindle.Cli.Commands;

/// <summary>
/// <c>spindle docs</c> (hidden): the manual pages and the bash completion, generated from the command tree itself so
/// they never disagree with <c>--help</c>. scripts/install.sh runs it; nobody needs to type it.
/// </summary>
internal static class DocsCommand
{
    public static Command Create(RootCommand root)
    {
        var directory = new Argument<string>("directory") { Description = "Where to write spindle.1 and spindle-COMMAND.1." };
        var man = new Command("man", "Write the manual pages (section 1) into DIRECTORY.") { directory };
        man.SetAction(parse =>
        {
            var target = parse.GetValue(directory)!;
            Directory.CreateDirectory(target);
            foreach (var (file, text) in ManPages(root))
            {
                File.WriteAllText(Path.Combine(target, file), text);
            }

            return 0;
        });
        var completion = new Command("bash-completion", "Print the bash completion script (for /usr/share/bash-completion/completions/spindle).");
        completion.SetAction(_ =>
        {
            Console.Out.Write(BashCompletion(root));
            return 0;
        });
        return new Command("docs", "Generate the manual pages and the bash completion.") { man, completion, };
    }

    private static string Version => typeof(DocsCommand).Assembly.GetName().Version?.ToString(3) ?? "0";

    /// <summary>spindle.1, then spindle-SUBCOMMAND.1 for each visible command (spindle-ctl.1 covers its verbs).</summary>
    internal static IEnumerable<(string File, string Text)> ManPages(RootCommand root)
    {
        var commands = root.Subcommands.Where(c => !c.Hidden && c.Name != "docs").ToList();
        var page = Header("spindle", FirstLine(root.Description));
        page.Append(".SH SYNOPSIS\n.B spindle\n\\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]\n");
        page.Append(".SH DESCRIPTION\n").Append(Escape(root.Description ?? string.Empty)).Append("\n.PP\nEach command has its own page and its own \\fB\\-\\-help\\fR.\n");
        page.Append(".SH COMMANDS\n");
        foreach (var command in commands)
        {
            page.Append(CultureInfo.InvariantCulture, $".TP\n.BR spindle\\-{command.Name} (1)\n{Escape(FirstLine(command.Description))}\n");
        }

        page.Append(".SH FILES\n.TP\n.I /etc/spindle/spindle.conf\nThe service's configuration (nbd-server's format).\n.TP\n.I /run/spindle/control.sock\nThe service's control socket (\\fBspindle ctl\\fR).\n");
        page.Append(".SH SEE ALSO\n").Append(string.Join(",\n", commands.Select(c => $".BR spindle\\-{c.Name} (1)"))).Append(",\n.BR nbd-server (5),\n.BR nbdinfo (1)\n");
        yield return ("spindle.1", page.ToString());

        foreach (var command in commands)
        {
            yield return ($"spindle-{command.Name}.1", CommandPage(command));
        }
    }

    private static string CommandPage(Command command)
    {
        var name = $"spindle-{command.Name}";
        var page = Header(name, FirstLine(command.Description));
        page.Append(".SH SYNOPSIS\n");
        if (command.Subcommands.Count > 0)
        {
            foreach (var verb in command.Subcommands)
            {
                page.Append(CultureInfo.InvariantCulture, $".B spindle {command.Name}\n[\\fIOPTIONS\\fR] \\fB{verb.Name}\\fR{Arguments(verb)}\n.br\n");
            }
        }
        else
        {
            page.Append(CultureInfo.InvariantCulture, $".B spindle {command.Name}\n[\\fIOPTIONS\\fR]{Arguments(command)}\n");
        }

        page.Append(".SH DESCRIPTION\n").Append(Description(command.Description ?? string.Empty));
        if (command.Arguments.Count > 0)
        {
            page.Append(".SH ARGUMENTS\n");
            foreach (var argument in command.Arguments)
            {
                page.Append(CultureInfo.InvariantCulture, $".TP\n.I {argument.Name}\n{Escape(argument.Description ?? string.Empty)}\n");
            }
        }

        if (command.Subcommands.Count > 0)
        {
            page.Append(".SH COMMANDS\n");
            foreach (var verb in command.Subcommands)
            {
                page.Append(CultureInfo.InvariantCulture, $".TP\n.B {verb.Name}{Arguments(verb)}\n{Escape(verb.Description ?? string.Empty)}\n");
            }
        }

        page.Append(".SH OPTIONS\n");
        foreach (var option in command.Options.Where(o => !o.Hidden))
        {
            var names = string.Join(", ", new[] { option.Name }.Concat(option.Aliases.Order(StringComparer.Ordinal)).Select(n => $"\\fB{Escape(n)}\\fR"));
            var value = TakesValue(option) ? $" \\fI{ValueName(option)}\\fR" : string.Empty;
            page.Append(CultureInfo.InvariantCulture, $".TP\n{names}{value}\n{Escape(option.Description ?? string.Empty)}\n");
        }

        page.Append(".TP\n\\fB\\-\\-help\\fR, \\fB\\-h\\fR\nShow the command's help.\n");
        page.Append(".SH SEE ALSO\n.BR spindle (1),\n.BR nbdinfo (1),\n.BR nbd-server (5)\n");
        return page.ToString();
    }

    private static StringBuilder Header(string name, string summary) => new StringBuilder()
        .Append(CultureInfo.InvariantCulture, $".TH {name.ToUpperInvariant().Replace("-", "\\-", StringComparison.Ordinal)} 1 \"\" \"spindle {Version}\" \"Spindle manual\"\n")
        .Append(CultureInfo.InvariantCulture, $".SH NAME\n{name.Replace("-", "\\-", StringComparison.Ordinal)} \\- {Escape(summary.TrimEnd('.'))}\n");

    private static string Arguments(Command command) =>
        string.Concat(command.Arguments.Select(a => a.Arity.MinimumNumberOfValues == 0 ? $" [\\fI{a.Name}\\fR{(a.Arity.MaximumNumberOfValues > 1 ? "..." : "")}]" : $" \\fI{a.Name}\\fR"));

    private static bool TakesValue(Option option) => option.ValueType != typeof(bool);

    private static string ValueName(Option option) => option.HelpName ?? option.Name.TrimStart('-').ToUpperInvariant().Replace('-', '_');

    /// <summary>The first sentence of the first paragraph: the NAME line's summary.</summary>
    private static string FirstLine(string? text)
    {
        var paragraph = string.Join(' ', (text ?? string.Empty).Split('\n').Select(l => l.Trim()).SkipWhile(l => l.Length == 0).TakeWhile(l => l.Length > 0));
        var stop = paragraph.IndexOf(". ", StringComparison.Ordinal);
        return (stop > 0 ? paragraph[..stop] : paragraph).TrimEnd('.', ':');
    }

    /// <summary>Prose lines become filled paragraphs; indented lines (examples) stay as written.</summary>
    private static string Description(string text)
    {
        var output = new StringBuilder();
        var preformatted = false;
        foreach (var raw in text.Replace("\r", string.Empty, StringComparison.Ordinal).Split('\n'))
        {
            var indented = raw.StartsWith(' ') && raw.Trim().Length > 0;
            if (indented != preformatted)
            {
                output.Append(indented ? ".PP\n.nf\n" : ".fi\n");
                preformatted = indented;
            }

            if (raw.Trim().Length == 0)
            {
                output.Append(preformatted ? "\n" : ".PP\n");
            }
            else
            {
                output.Append(Escape(preformatted ? raw : raw.Trim())).Append('\n');
            }
        }

        if (preformatted)
        {
            output.Append(".fi\n");
        }

        return output.ToString();
    }

    /// <summary>roff: backslashes doubled, hyphens as minus signs, and no line may start with a control character.</summary>
    private static string Escape(string text)
    {
        var escaped = text.Replace("\\", "\\e", StringComparison.Ordinal).Replace("-", "\\-", StringComparison.Ordinal);
        return string.Join('\n', escaped.Split('\n').Select(line => line.StartsWith('.') || line.StartsWith('\'') ? "\\&" + line : line));
    }

    /// <summary>A bash completion function: commands, ctl verbs, each command's options, files for the rest.</summary>
    internal static string BashCompletion(RootCommand root)
    {
        var commands = root.Subcommands.Where(c => !c.Hidden && c.Name != "docs").ToList();
        var script = new StringBuilder();
        script.Append("# bash completion for spindle (generated by: spindle docs bash-completion)\n");
        script.Append("_spindle()\n{\n    local cur prev cmd=\"\" verb=\"\" i word opts\n");
        script.Append("    cur=\"${COMP_WORDS[COMP_CWORD]}\"\n    prev=\"${COMP_WORDS[COMP_CWORD-1]}\"\n");
        script.Append("    for ((i = 1; i < COMP_CWORD; i++)); do\n        word=\"${COMP_WORDS[i]}\"\n");
        script.Append("        case \"$word\" in\n            -*) ;;\n            *)\n");
        script.Append("                if [[ -z $cmd ]]; then cmd=\"$word\"\n");
        script.Append("                elif [[ $cmd == ctl && -z $verb && ${COMP_WORDS[i-1]} != -s && ${COMP_WORDS[i-1]} != --socket ]]; then verb=\"$word\"\n                fi ;;\n");
        script.Append("        esac\n    done\n");
        script.Append("    case \"$prev\" in\n");
        var valueOptions = commands.SelectMany(c => c.Options.Concat(c.Subcommands.SelectMany(v => v.Options))).Where(o => !o.Hidden && TakesValue(o))
            .SelectMany(o => new[] { o.Name }.Concat(o.Aliases)).Distinct().Order(StringComparer.Ordinal).ToList();
        var fileOptions = new HashSet<string>(["--config", "-C", "--pid-file", "--unix", "-U", "--tls-certificates", "--dir", "--state-dir", "--socket", "-s", "--rbd-conf", "--rbd-keyring", "--create"], StringComparer.Ordinal);
        script.Append(CultureInfo.InvariantCulture, $"        {string.Join("|", valueOptions.Where(fileOptions.Contains))})\n            COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n");
        script.Append(CultureInfo.InvariantCulture, $"        {string.Join("|", valueOptions.Where(o => !fileOptions.Contains(o)))})\n            COMPREPLY=(); return ;;\n");
        script.Append("    esac\n    case \"$cmd\" in\n");
        script.Append(CultureInfo.InvariantCulture, $"        \"\")\n            COMPREPLY=($(compgen -W \"{string.Join(' ', commands.Select(c => c.Name))} --help --version\" -- \"$cur\")); return ;;\n");
        foreach (var command in commands)
        {
            var options = string.Join(' ', command.Options.Where(o => !o.Hidden).SelectMany(o => new[] { o.Name }.Concat(o.Aliases)).Append("--help"));
            if (command.Subcommands.Count > 0)
            {
                script.Append(CultureInfo.InvariantCulture, $"        {command.Name})\n            if [[ -z $verb && $cur != -* ]]; then COMPREPLY=($(compgen -W \"{string.Join(' ', command.Subcommands.Select(v => v.Name))}\" -- \"$cur\")); return; fi\n");
                script.Append(CultureInfo.InvariantCulture, $"            opts=\"{options}\" ;;\n");
            }
            else
            {
                script.Append(CultureInfo.InvariantCulture, $"        {command.Name}) opts=\"{options}\" ;;\n");
            }
        }

        script.Append("        *) opts=\"--help\" ;;\n    esac\n");
        script.Append("    if [[ $cur == -* ]]; then\n        COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\"))\n    else\n        COMPREPLY=($(compgen -f -- \"$cur\"))\n    fi\n}\n");
        script.Append("complete -o filenames -F _spindle spindle\n");
        return script.ToString();
    }
}
