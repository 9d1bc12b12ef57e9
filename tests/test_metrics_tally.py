"""Tallied metrics (gpserve.metrics.Tally) write what prometheus-client's own updates
would have written: the same bucket counts, sums and counter values, once flushed."""
from prometheus_client import CollectorRegistry, Counter, Histogram

from gpserve import metrics

BUCKETS = (0.001, 0.01, 0.1, 1)
VALUES = [0.0005, 0.001, 0.002, 0.05, 0.1, 0.5, 3.0, 7.5, 0.001]


def samples(registry, name):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in registry.collect() for s in m.samples
            if s.name.startswith(name) and not s.name.endswith("_created")}


def test_a_flushed_tally_equals_direct_observation():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tallied = metrics.TallyHistogram(Histogram("t_seconds", "t", buckets=BUCKETS,
                                               registry=ours))
    direct = Histogram("t_seconds", "t", buckets=BUCKETS, registry=theirs)
    counted = metrics.TallyCounter(Counter("c", "c", ["k"], registry=ours))
    direct_count = Counter("c", "c", ["k"], registry=theirs)
    for v in VALUES:
        tallied.observe(v)
        direct.observe(v)
        counted.labels("a").inc()
        direct_count.labels("a").inc()
    counted.labels("b").inc(5)
    direct_count.labels("b").inc(5)
    metrics.flush()
    assert samples(ours, "t_seconds") == samples(theirs, "t_seconds")
    assert samples(ours, "c") == samples(theirs, "c")
    assert samples(ours, "t_seconds")[("t_seconds_count", ())] == len(VALUES)
    metrics.flush()                                   # nothing pending: nothing changes
    assert samples(ours, "t_seconds") == samples(theirs, "t_seconds")


def test_a_tallied_gauge_writes_its_latest_value_once_flushed():
    from prometheus_client import CollectorRegistry, Gauge
    ours = CollectorRegistry()
    gauge = metrics.TallyGauge(Gauge("g_rows", "g", registry=ours))
    for v in (3, 9, 4):
        gauge.set(v)
    assert ours.get_sample_value("g_rows") in (0.0, 4.0)   # 4 if a flush fell due meanwhile
    metrics.flush()
    assert ours.get_sample_value("g_rows") == 4.0
