use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::*;
use crate::test_support::{macro_calls, workspace_sources};

/// A metric as the code writes it.
struct Written {
    kind: MetricKind,
    /// A file that writes it.
    place: String,
    /// The label keys of each place that writes it, sorted.
    label_keys: BTreeSet<Vec<String>>,
    /// Every file that writes it (indexes into the sources scanned).
    files: BTreeSet<usize>,
}

/// Every `counter!`, `gauge!` and `histogram!` in the workspace's library
/// and binary sources outside comments and this module, which must name a
/// literal `ringkv_…` metric (a name built at run time would escape the
/// catalog); with its kind, a place, and its label keys (`"key" =>`).
fn metrics_written(sources: &[(PathBuf, String)]) -> BTreeMap<String, Written> {
    let mut found: BTreeMap<String, Written> = BTreeMap::new();
    for (index, (file, text)) in sources.iter().enumerate() {
        if file.to_string_lossy().contains("metrics_catalog") {
            continue;
        }
        let place = file.display().to_string();
        for (macro_name, kind) in [
            ("counter!", Counter),
            ("gauge!", Gauge),
            ("histogram!", Histogram),
        ] {
            for args in macro_calls(text, macro_name) {
                let name = args
                    .trim_start()
                    .strip_prefix('"')
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_else(|| {
                        panic!("{place}: {macro_name}({args}) names no literal metric")
                    });
                assert!(name.starts_with("ringkv_"), "{place}: {name}");
                let mut keys: Vec<String> = args
                    .match_indices("\" =>")
                    .map(|(end, _)| {
                        let start = args[..end].rfind('"').unwrap() + 1;
                        args[start..end].to_string()
                    })
                    .collect();
                keys.sort();
                let written = found.entry(name.to_string()).or_insert_with(|| Written {
                    kind,
                    place: place.clone(),
                    label_keys: BTreeSet::new(),
                    files: BTreeSet::new(),
                });
                assert_eq!(
                    written.kind, kind,
                    "{name} is written as two kinds: {}, {place}",
                    written.place
                );
                written.label_keys.insert(keys);
                written.files.insert(index);
            }
        }
    }
    found
}

/// The catalog names exactly what the code writes, each as the kind it is
/// written as: a new metric without help text, or a stale entry, fails.
#[test]
fn the_catalog_names_every_metric_the_code_writes() {
    let sources = workspace_sources();
    let written = metrics_written(&sources);
    let mut catalog = BTreeMap::new();
    for m in METRICS {
        assert!(catalog.insert(m.name, m.kind).is_none(), "{} twice", m.name);
        assert!(m.name.starts_with("ringkv_"), "{}", m.name);
        assert!(!m.help.is_empty(), "{}", m.name);
        if m.kind == Gauge {
            assert!(
                m.zeroed.iter().all(|labels| labels.is_empty()),
                "a gauge starts at 0 only unlabelled: {}",
                m.name
            );
        }
    }
    for (name, w) in &written {
        assert_eq!(
            catalog.get(name.as_str()),
            Some(&w.kind),
            "{name} (written in {}) is missing from METRICS, or listed as another kind",
            w.place
        );
    }
    // A series started at 0 has the label keys some write of it has, and
    // each value is a literal in a file that writes it (a value renamed
    // there fails here): else it would sit at 0 beside the real ones.
    for m in METRICS {
        let writers: Vec<&str> = written[m.name]
            .files
            .iter()
            .map(|&i| sources[i].1.as_str())
            .collect();
        for labels in m.zeroed {
            for (_, value) in *labels {
                let literal = format!("\"{value}\"");
                assert!(
                    writers.iter().any(|text| text.contains(&literal)),
                    "{} starts at 0 with the label value {literal}, which no file writing it has",
                    m.name
                );
            }
            let mut keys: Vec<String> = labels.iter().map(|(k, _)| k.to_string()).collect();
            keys.sort();
            let used = &written[m.name].label_keys;
            assert!(
                used.contains(&keys),
                "{} starts at 0 with labels {keys:?}, but is written with {used:?}",
                m.name
            );
        }
    }
    for name in catalog.keys() {
        assert!(
            written.contains_key(*name),
            "{name} is in METRICS but nothing writes it"
        );
    }
}

/// Described and zeroed, a counter nothing has bumped is exported at 0 with
/// its help text; a labelled one, for each label set known ahead. So are
/// the gauges that start at 0, and histograms, empty.
#[test]
fn series_known_ahead_are_exported_from_the_start_with_their_help() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, describe_all);
    let text = handle.render();
    for line in [
        "# HELP ringkv_requests_shed_total Requests answered",
        "# TYPE ringkv_requests_shed_total counter",
        "ringkv_requests_shed_total 0",
        "ringkv_requests_total{op=\"put\",result=\"ok\"} 0",
        "ringkv_requests_total{op=\"delete\",result=\"quorum_failed\"} 0",
        "ringkv_ring_handover_passes_total{outcome=\"abandoned\"} 0",
        "# TYPE ringkv_connections gauge",
        "ringkv_connections 0",
        "ringkv_read_repair_queue_depth 0",
        "# HELP ringkv_request_seconds Time to answer a client request",
        "ringkv_request_seconds_count{op=\"get\"} 0",
        "ringkv_request_seconds_count{op=\"delete\"} 0",
        "ringkv_anti_entropy_round_seconds_count 0",
        "ringkv_wal_flush_writes_count 0",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    // Every histogram, with no exception to remember.
    for m in METRICS.iter().filter(|m| m.kind == MetricKind::Histogram) {
        let count = format!("{}_count", m.name);
        assert!(text.contains(&count), "{count} not in:\n{text}");
    }
    // Per-peer series are only known at run time, and a gauge whose first
    // value is computed appears once it is.
    assert!(!text.contains("ringkv_hints_stored_total{"), "{text}");
    assert!(!text.contains("ringkv_hints_pending"), "{text}");
    assert!(!text.contains("ringkv_hints_bytes "), "{text}");
}
