using Spindle.Server;
using Spindle.Server.Exports;
using Spindle.Storage;

namespace Spindle.Cli.Hosting;

/// <summary>
/// Exports while the server runs: opening them, and changing the set live. A reload compares the file's exports with
/// the running ones by their definitions: new ones are opened and added; removed ones are drained (their clients
/// finish what is in flight, then get ESHUTDOWN); changed ones are replaced for new connections (sharing the open
/// device when only options changed); unchanged ones are not touched at all, so their clients never notice. Everything
/// that can fail (reading the file, opening devices, loading certificates) happens before anything is changed: a
/// reload applies whole or not at all.
/// </summary>
internal sealed partial class ServerHost
{
    /// <summary>The outcome of a change, for the log and the control socket.</summary>
    internal sealed record ChangeResult(bool Ok, string Message);

    private async Task OpenExportsAsync(ServerConfiguration configuration)
    {
        foreach (var definition in configuration.Exports)
        {
            if (definition.Backend == "directory")
            {
                _catalog.Add(OpenDirectory(definition));
                continue;
            }

            var export = await OpenAsync(definition, configuration).ConfigureAwait(false);
            try
            {
                _catalog.Add(export);
            }
            catch (ArgumentException)
            {
                await export.DisposeAsync().ConfigureAwait(false);
                throw;
            }

            _definitions[definition.Options.Name] = definition;
        }
    }

    private static DirectoryExportProvider OpenDirectory(ExportDefinition definition) => new(new DirectoryExportOptions
    {
        Root = definition.Location!,
        Prefix = definition.Prefix ?? definition.Options.Name,
        Template = definition.Options,
        OpenImage = ImageBackend.DirectoryOpener(ImageBackend.ParseFormat(definition.Format, definition.Source)),
    });

    /// <summary>
    /// Opens an export's device (the backend, a qcow2 image's virtual disk, with the export's layers stacked on it)
    /// and gives it its UUID. Throws ConfigurationException, IOException or ArgumentException.
    /// </summary>
    private async Task<Export> OpenAsync(ExportDefinition definition, ServerConfiguration configuration)
    {
        var device = await LayerStack.OpenAsync(definition, CancellationToken.None).ConfigureAwait(false);
        try
        {
            foreach (var warning in ImageBackend.WarningsOf(device))
            {
                HostLog.ImageWarning(_logger, device.Description, warning);
            }

            if (ImageBackend.Describe(device) is { } details)
            {
                HostLog.ImageOpened(_logger, device.Description, details);
            }

            var export = new Export(definition.Options, device);
            export.Uuid = ExportIdentity.Assign(definition.Options, IdentityOf(device), configuration.StateDirectory ?? ExportIdentity.DefaultStateDirectory(), out var note);
            HostLog.ExportUuid(_logger, export.Name, export.Uuid, note);
            return export;
        }
        catch
        {
            await device.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>
    /// What an export's UUID is kept with: the device itself, so a partition or an overlay of an image has a UUID
    /// of its own (kept in the state directory by its description) and the base file is never touched; but a
    /// memory disk under layers still gets a new one each run.
    /// </summary>
    private static BlockDevice IdentityOf(BlockDevice device) =>
        device is Spindle.Storage.Layers.LayerDevice { Backend: MemoryBlockDevice memory } ? memory : device;

    /// <summary>Re-reads the configuration file and applies the difference (SIGHUP, <c>spindle ctl reload</c>).</summary>
    public async Task<ChangeResult> ReloadAsync(string trigger)
    {
        await _changes.WaitAsync().ConfigureAwait(false);
        _notifier?.Reloading();
        try
        {
            var result = await ReloadLockedAsync(trigger).ConfigureAwait(false);
            if (result.Ok)
            {
                HostLog.Reloaded(_logger, trigger, result.Message);
            }
            else
            {
                HostLog.ReloadRefused(_logger, trigger, result.Message);
            }

            return result;
        }
        finally
        {
            _notifier?.Ready(StatusLine());
            _changes.Release();
        }
    }

    private async Task<ChangeResult> ReloadLockedAsync(string trigger)
    {
        ServerConfiguration next;
        try
        {
            next = _options.ConfigFile is { } file ? IniConfigurationReader.ReadFile(file) : _configuration;
            if (_options.ForceReadOnly)
            {
                next.Exports.ForEach(e => e.Options.ReadOnly = true);
            }

            if (_options.ConfigFile is not null && next.Exports.Count == 0)
            {
                throw new ConfigurationException($"{_options.ConfigFile}: no exports defined (add a [name] section)");
            }

            // Certificates are read again even when the file did not change: renewed ones apply to new handshakes.
            next.LoadTls();
            CheckTls(next);
        }
        catch (ConfigurationException exception)
        {
            return new ChangeResult(false, exception.Message);
        }

        foreach (var warning in next.Warnings)
        {
            HostLog.ConfigurationWarning(_logger, warning);
        }

        WarnAboutRestartOnlyChanges(next);
        var wanted = next.Exports.Where(d => d.Backend != "directory").ToDictionary(d => d.Options.Name, StringComparer.Ordinal);
        var added = wanted.Keys.Where(name => !_definitions.ContainsKey(name)).ToList();
        var removed = _definitions.Keys.Where(name => !wanted.ContainsKey(name)).ToList();
        var changed = wanted.Keys.Where(name => _definitions.TryGetValue(name, out var old) && old.Fingerprint != wanted[name].Fingerprint).ToList();

        // Open everything new first: a device that cannot be opened refuses the whole reload, nothing half-applied.
        var opened = new Dictionary<string, Export>(StringComparer.Ordinal);
        try
        {
            foreach (var name in added.Concat(changed))
            {
                var definition = wanted[name];
                opened[name] = changed.Contains(name) && _definitions[name].DeviceFingerprint == definition.DeviceFingerprint && _catalog.TryGet(name, out var current) && current.Name == name
                    ? current.WithOptions(definition.Options)
                    : await OpenAsync(definition, next).ConfigureAwait(false);
            }
        }
        catch (Exception exception) when (exception is ConfigurationException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            foreach (var export in opened.Values)
            {
                await export.DisposeAsync().ConfigureAwait(false);
            }

            return new ChangeResult(false, exception.Message);
        }

        foreach (var name in removed)
        {
            _catalog.Remove(name);
            _definitions.Remove(name);
            HostLog.ExportChanged(_logger, name, "removed: its clients drain", trigger);
        }

        foreach (var name in changed)
        {
            _catalog.Replace(opened[name]);
            _definitions[name] = wanted[name];
            HostLog.ExportChanged(_logger, name, "changed: new connections get the new settings", trigger);
        }

        foreach (var name in added)
        {
            _catalog.Add(opened[name]);
            _definitions[name] = wanted[name];
            HostLog.ExportChanged(_logger, name, "added", trigger);
        }

        ApplyServerSettings(next);
        _configuration = next;
        var unchanged = wanted.Count - added.Count - changed.Count;
        return new ChangeResult(true, $"{added.Count} added, {removed.Count} removed, {changed.Count} changed, {unchanged} unchanged" +
            (Server.Options.Tls is null ? string.Empty : "; TLS certificates reloaded"));
    }

    /// <summary>The checks NbdServer makes at construction, made again for a configuration about to replace the running one.</summary>
    private static void CheckTls(ServerConfiguration configuration)
    {
        foreach (var definition in configuration.Exports)
        {
            if (definition.Options.Access?.Identities is not null && configuration.Server.Tls?.ClientCertificateAuthorities is null)
            {
                throw new ConfigurationException($"{definition.Source}: export '{definition.Options.Name}' allows TLS identities but the server verifies no client certificates (it needs a ca-cert.pem)");
            }
        }
    }

    /// <summary>Server-wide settings a reload can apply to a running server (each read afresh by new connections).</summary>
    private void ApplyServerSettings(ServerConfiguration next)
    {
        var options = Server.Options;
        options.Tls = next.Server.Tls;
        options.AllowList = next.Server.AllowList;
        options.MaxConnections = next.Server.MaxConnections;
        options.HandshakeTimeout = next.Server.HandshakeTimeout;
        options.ShutdownTimeout = next.Server.ShutdownTimeout;
        _catalog.DefaultExportName = next.DefaultExport;
        _catalog.ListAliases = next.ListAliases;
    }

    private void WarnAboutRestartOnlyChanges(ServerConfiguration next)
    {
        if (_options.ConfigFile is null)
        {
            return;
        }

        next.ResolveEndpoints();
        var current = _configuration.Server.Endpoints.Where(e => e is not ListenEndpoint.Inherited).ToList();
        if (current.Count > 0 && !current.SequenceEqual(next.Server.Endpoints))
        {
            HostLog.NeedsRestart(_logger, "the listening addresses (port, listenaddr, unixsock)");
        }

        if (next.User != _configuration.User || next.Group != _configuration.Group)
        {
            HostLog.NeedsRestart(_logger, "user or group");
        }

        var directories = string.Join(";", next.Exports.Where(d => d.Backend == "directory").Select(d => d.Fingerprint));
        if (directories != string.Join(";", _configuration.Exports.Where(d => d.Backend == "directory").Select(d => d.Fingerprint)))
        {
            HostLog.NeedsRestart(_logger, "a directory export");
        }

        if ((next.MetricsAddress, next.ControlSocket) != (_configuration.MetricsAddress, _configuration.ControlSocket))
        {
            HostLog.NeedsRestart(_logger, "metrics or control_socket");
        }
    }

    /// <summary><c>spindle ctl add</c>: a new export from configuration keys.</summary>
    public async Task<ChangeResult> AddAsync(string name, IReadOnlyList<KeyValuePair<string, string>> settings)
    {
        await _changes.WaitAsync().ConfigureAwait(false);
        try
        {
            if (_definitions.ContainsKey(name))
            {
                return new ChangeResult(false, $"an export named '{name}' already exists (use change)");
            }

            var definition = IniConfigurationReader.ParseExport(name, settings, "spindle ctl add");
            if (definition.Backend == "directory")
            {
                return new ChangeResult(false, "directory exports are added by the configuration file and a restart");
            }

            var export = await OpenAsync(definition, _configuration).ConfigureAwait(false);
            try
            {
                _catalog.Add(export);
            }
            catch (ArgumentException)
            {
                await export.DisposeAsync().ConfigureAwait(false);
                throw;
            }

            _definitions[name] = definition;
            HostLog.ExportChanged(_logger, name, "added", "control socket");
            return new ChangeResult(true, $"export '{name}' added: {export}");
        }
        catch (Exception exception) when (exception is ConfigurationException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            return new ChangeResult(false, exception is ArgumentException argument ? Commands.ClientCommandSupport.Clean(argument) : exception.Message);
        }
        finally
        {
            _changes.Release();
        }
    }

    /// <summary>
    /// <c>spindle ctl change</c>: the export's keys with these set (a value of "" removes a key); new connections get
    /// the result, existing ones keep what they negotiated.
    /// </summary>
    public async Task<ChangeResult> ChangeAsync(string name, IReadOnlyList<KeyValuePair<string, string>> settings)
    {
        await _changes.WaitAsync().ConfigureAwait(false);
        try
        {
            if (!_definitions.TryGetValue(name, out var old) || !_catalog.TryGet(name, out var current) || current.Name != name)
            {
                return new ChangeResult(false, $"there is no export named '{name}'");
            }

            var keys = old.Keys.Where(pair => !settings.Any(s => s.Key.Equals(pair.Key, StringComparison.OrdinalIgnoreCase))).ToList();
            keys.AddRange(settings.Where(pair => pair.Value.Length > 0));
            var definition = IniConfigurationReader.ParseExport(name, keys, "spindle ctl change");
            if (definition.Fingerprint == old.Fingerprint)
            {
                return new ChangeResult(true, $"export '{name}' unchanged");
            }

            var replacement = definition.DeviceFingerprint == old.DeviceFingerprint ? current.WithOptions(definition.Options) : await OpenAsync(definition, _configuration).ConfigureAwait(false);
            try
            {
                _catalog.Replace(replacement);
            }
            catch (ArgumentException)
            {
                await replacement.DisposeAsync().ConfigureAwait(false);
                throw;
            }

            _definitions[name] = definition;
            HostLog.ExportChanged(_logger, name, "changed: new connections get the new settings", "control socket");
            return new ChangeResult(true, $"export '{name}' changed: {replacement}");
        }
        catch (Exception exception) when (exception is ConfigurationException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            return new ChangeResult(false, exception is ArgumentException argument ? Commands.ClientCommandSupport.Clean(argument) : exception.Message);
        }
        finally
        {
            _changes.Release();
        }
    }

    /// <summary><c>spindle ctl remove</c>: the export's clients drain, then its device is flushed and closed.</summary>
    public async Task<ChangeResult> RemoveAsync(string name)
    {
        await _changes.WaitAsync().ConfigureAwait(false);
        try
        {
            if (_catalog.Remove(name) is not { } export)
            {
                return new ChangeResult(false, $"there is no export named '{name}'");
            }

            _definitions.Remove(name);
            HostLog.ExportChanged(_logger, name, "removed: its clients drain", "control socket");
            return new ChangeResult(true, $"export '{name}' removed; {export.ConnectionCount} connection(s) draining");
        }
        finally
        {
            _changes.Release();
        }
    }

    /// <summary><c>spindle ctl disconnect</c>: in-flight requests finish, then the client gets ESHUTDOWN.</summary>
    public ChangeResult Disconnect(long id)
    {
        if (!Server.Disconnect(id))
        {
            return new ChangeResult(false, $"there is no connection {id}");
        }

        HostLog.Disconnected(_logger, id);
        return new ChangeResult(true, $"connection {id} is draining: in-flight requests finish, then it gets ESHUTDOWN");
    }
}
