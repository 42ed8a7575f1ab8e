// Servers, Prometheus and Chromium are heavy on a 2-core machine: one test class at a time.
[assembly: Xunit.CollectionBehavior(DisableTestParallelization = true)]
