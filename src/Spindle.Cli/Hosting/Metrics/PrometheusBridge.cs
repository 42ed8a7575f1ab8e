using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using Prometheus;

namespace Spindle.Cli.Hosting.Metrics;

/// <summary>
/// Carries Spindle's System.Diagnostics.Metrics instruments into a prometheus-net registry, whose serializer writes
/// the text exposition format. prometheus-net's own MeterAdapter is not used: it publishes every .NET counter as a
/// Prometheus gauge (no <c>_total</c>, no rate semantics), prefixes names with the meter's, and sorts and copies the
/// tags of every measurement, which would put allocations on the server's request path. Here each instrument maps to
/// the matching Prometheus type once (Counter and ObservableCounter to counters, up-down counters and gauges to
/// gauges, Histogram to a histogram with latency buckets), named by Prometheus' conventions (dots to underscores, the
/// base unit appended, <c>_total</c> on counters), and each label set's child is cached under a key built without
/// allocating. Series an observable instrument no longer reports (a removed export) are dropped at the next scrape.
/// </summary>
internal sealed class PrometheusBridge : IDisposable
{
    /// <summary>Request latencies span memory-speed hits (microseconds) to a slow device or a network hop (seconds).</summary>
    private static readonly double[] LatencyBuckets =
        [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

    private readonly MeterListener _listener = new();
    private readonly ConcurrentDictionary<Instrument, Bridge> _bridges = new();
    private readonly Lock _scrapeLock = new();
    private readonly HashSet<string> _meters;
    private volatile bool _disposed;

    /// <param name="meters">The meters to publish (by name), for example Spindle.Server and Spindle.Client.</param>
    public PrometheusBridge(params string[] meters)
    {
        _meters = new HashSet<string>(meters, StringComparer.Ordinal);
        Registry = Prometheus.Metrics.NewCustomRegistry();

        // The process' own figures (CPU, memory, threads, GC), as every prometheus-net exporter has them.
        DotNetStats.Register(Registry);
        _listener.InstrumentPublished = (instrument, listener) =>
        {
            if (_meters.Contains(instrument.Meter.Name))
            {
                _bridges[instrument] = Bridge.For(instrument, Prometheus.Metrics.WithCustomRegistry(Registry));
                listener.EnableMeasurementEvents(instrument);
            }
        };
        _listener.SetMeasurementEventCallback<long>((instrument, value, tags, _) => Record(instrument, value, tags));
        _listener.SetMeasurementEventCallback<int>((instrument, value, tags, _) => Record(instrument, value, tags));
        _listener.SetMeasurementEventCallback<double>((instrument, value, tags, _) => Record(instrument, value, tags));
        _listener.Start();
        Registry.AddBeforeCollectCallback(Observe);
    }

    /// <summary>The registry to serialize (CollectAndExportAsTextAsync).</summary>
    public CollectorRegistry Registry { get; }

    public void Dispose()
    {
        _disposed = true;
        _listener.Dispose();
    }

    private void Record(Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
    {
        if (_bridges.TryGetValue(instrument, out var bridge))
        {
            bridge.Record(value, tags);
        }
    }

    /// <summary>Before each scrape: the observable instruments report, and series they did not report are dropped.</summary>
    private void Observe()
    {
        if (_disposed)
        {
            return;
        }

        lock (_scrapeLock)
        {
            foreach (var bridge in _bridges.Values)
            {
                bridge.BeginRound();
            }

            _listener.RecordObservableInstruments();
            foreach (var bridge in _bridges.Values)
            {
                bridge.EndRound();
            }
        }
    }

    /// <summary>Prometheus' name for an instrument: <c>spindle.server.bytes</c> (By) becomes <c>spindle_server_bytes_total</c>.</summary>
    internal static string NameFor(Instrument instrument, bool counter)
    {
        var name = instrument.Name.Replace('.', '_').Replace('-', '_');
        var unit = instrument.Unit switch
        {
            "By" => "bytes",
            "s" => "seconds",
            _ => null,
        };
        if (unit is not null && !name.EndsWith("_" + unit, StringComparison.Ordinal) && name != unit)
        {
            name += "_" + unit;
        }

        return counter ? name + "_total" : name;
    }

    /// <summary>One instrument's Prometheus collector and its children by label values.</summary>
    private abstract class Bridge
    {
        private readonly ConcurrentDictionary<LabelKey, object> _children = new();
        private readonly HashSet<LabelKey> _seen = [];
        private string[]? _labelNames;
        private bool _observing;

        protected Bridge(Instrument instrument)
        {
            Instrument = instrument;
            IsObservable = instrument.IsObservable;
        }

        protected Instrument Instrument { get; }

        private bool IsObservable { get; }

        public static Bridge For(Instrument instrument, IMetricFactory factory)
        {
            var type = instrument.GetType().GetGenericTypeDefinition();
            if (type == typeof(Counter<>) || type == typeof(ObservableCounter<>))
            {
                return new CounterBridge(instrument, factory);
            }

            if (type == typeof(Histogram<>))
            {
                return new HistogramBridge(instrument, factory);
            }

            return new GaugeBridge(instrument, factory);
        }

        public void Record(double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            // Label names come from the first measurement, sorted; Spindle's instruments always send the same tags.
            var names = _labelNames ??= CreateCollector(tags);
            var key = LabelKey.From(names, tags);
            var child = _children.GetOrAdd(key, static (key, state) => state.CreateChild(key.Values(state._labelNames!.Length)), this);
            Apply(child, value);
            if (_observing)
            {
                _seen.Add(key);
            }
        }

        public void BeginRound()
        {
            _observing = IsObservable;
            _seen.Clear();
        }

        public void EndRound()
        {
            if (!_observing)
            {
                return;
            }

            _observing = false;
            foreach (var key in _children.Keys)
            {
                if (!_seen.Contains(key) && _children.TryRemove(key, out _))
                {
                    Remove(key.Values(_labelNames!.Length));
                }
            }
        }

        protected static string Help(Instrument instrument) => string.IsNullOrEmpty(instrument.Description) ? instrument.Name : instrument.Description;

        protected abstract string[] CreateCollector(ReadOnlySpan<KeyValuePair<string, object?>> tags);

        protected abstract object CreateChild(string[] labelValues);

        protected abstract void Apply(object child, double value);

        protected abstract void Remove(string[] labelValues);

        protected static string[] LabelNames(ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            var names = new string[tags.Length];
            for (var i = 0; i < tags.Length; i++)
            {
                names[i] = tags[i].Key.Replace('.', '_');
            }

            Array.Sort(names, StringComparer.Ordinal);
            return names;
        }
    }

    private sealed class CounterBridge(Instrument instrument, IMetricFactory factory) : Bridge(instrument)
    {
        private Counter? _counter;

        protected override string[] CreateCollector(ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            var names = LabelNames(tags);
            _counter = factory.CreateCounter(NameFor(Instrument, counter: true), Help(Instrument), names);
            return names;
        }

        protected override object CreateChild(string[] labelValues) => _counter!.WithLabels(labelValues);

        // A .NET Counter reports increments; an ObservableCounter reports the running total.
        protected override void Apply(object child, double value)
        {
            if (Instrument.IsObservable)
            {
                ((Counter.Child)child).IncTo(value);
            }
            else
            {
                ((Counter.Child)child).Inc(value);
            }
        }

        protected override void Remove(string[] labelValues) => _counter!.RemoveLabelled(labelValues);
    }

    private sealed class GaugeBridge(Instrument instrument, IMetricFactory factory) : Bridge(instrument)
    {
        private Gauge? _gauge;

        protected override string[] CreateCollector(ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            var names = LabelNames(tags);
            _gauge = factory.CreateGauge(NameFor(Instrument, counter: false), Help(Instrument), names);
            return names;
        }

        protected override object CreateChild(string[] labelValues) => _gauge!.WithLabels(labelValues);

        // An UpDownCounter reports changes; the observable kinds report the current value.
        protected override void Apply(object child, double value)
        {
            if (Instrument.IsObservable)
            {
                ((Gauge.Child)child).Set(value);
            }
            else
            {
                ((Gauge.Child)child).Inc(value);
            }
        }

        protected override void Remove(string[] labelValues) => _gauge!.RemoveLabelled(labelValues);
    }

    private sealed class HistogramBridge(Instrument instrument, IMetricFactory factory) : Bridge(instrument)
    {
        private Histogram? _histogram;

        protected override string[] CreateCollector(ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            var names = LabelNames(tags);
            _histogram = factory.CreateHistogram(NameFor(Instrument, counter: false), Help(Instrument), names,
                new HistogramConfiguration { Buckets = Instrument.Unit == "s" ? LatencyBuckets : Histogram.ExponentialBuckets(1, 2, 16) });
            return names;
        }

        protected override object CreateChild(string[] labelValues) => _histogram!.WithLabels(labelValues);

        protected override void Apply(object child, double value) => ((Histogram.Child)child).Observe(value);

        protected override void Remove(string[] labelValues) => _histogram!.RemoveLabelled(labelValues);
    }

    /// <summary>Up to four label values in label-name order, compared by value: a dictionary key with no allocation.</summary>
    private readonly record struct LabelKey(string? A, string? B, string? C, string? D)
    {
        public static LabelKey From(string[] names, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            string? a = null, b = null, c = null, d = null;
            foreach (var tag in tags)
            {
                var value = tag.Value as string ?? tag.Value?.ToString() ?? string.Empty;
                var index = IndexOf(names, tag.Key);
                switch (index)
                {
                    case 0: a = value; break;
                    case 1: b = value; break;
                    case 2: c = value; break;
                    case 3: d = value; break;
                }
            }

            return new LabelKey(a, b, c, d);
        }

        public string[] Values(int count)
        {
            var values = new[] { A ?? string.Empty, B ?? string.Empty, C ?? string.Empty, D ?? string.Empty };
            return values[..count];
        }

        private static int IndexOf(string[] names, string key)
        {
            for (var i = 0; i < names.Length; i++)
            {
                if (string.Equals(names[i], key, StringComparison.Ordinal) || (key.Contains('.', StringComparison.Ordinal) && names[i] == key.Replace('.', '_')))
                {
                    return i;
                }
            }

            return -1;
        }
    }
}
