use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

/// Every `counter!("ringkv_…")`, `gauge!(…)` and `histogram!(…)` with a
/// literal name in the workspace's library and binary sources, with its
/// kind and where it is.
fn metrics_written() -> BTreeMap<String, (MetricKind, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "src",
        "core/src",
        "ring/src",
        "coordinator/src",
        "repair/src",
        "node/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "sources found: {files:?}");
    let mut found = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (macro_name, kind) in [
            ("counter!(", Counter),
            ("gauge!(", Gauge),
            ("histogram!(", Histogram),
        ] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = text[at + macro_name.len()..].trim_start();
                let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
                    continue;
                };
                // This file's own search strings are not metrics.
                let plain = name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !name.starts_with("ringkv_") || !plain {
                    continue;
                }
                let place = format!("{}", file.display());
                if let Some((other, there)) = found.insert(name.to_string(), (kind, place.clone()))
                {
                    assert_eq!(
                        other, kind,
                        "{name} is written as two kinds: {there}, {place}"
                    );
                }
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The catalog names exactly what the code writes, each as the kind it is
/// written as: a new metric without help text, or a stale entry, fails.
#[test]
fn the_catalog_names_every_metric_the_code_writes() {
    let written = metrics_written();
    let mut catalog = BTreeMap::new();
    for m in METRICS {
        assert!(catalog.insert(m.name, m.kind).is_none(), "{} twice", m.name);
        assert!(m.name.starts_with("ringkv_"), "{}", m.name);
        assert!(!m.help.is_empty(), "{}", m.name);
        if m.kind != Counter {
            assert!(m.zeroed.is_empty(), "only counters start at 0: {}", m.name);
        }
    }
    for (name, (kind, place)) in &written {
        assert_eq!(
            catalog.get(name.as_str()),
            Some(kind),
            "{name} (written in {place}) is missing from METRICS, or listed as another kind"
        );
    }
    for name in catalog.keys() {
        assert!(
            written.contains_key(*name),
            "{name} is in METRICS but nothing writes it"
        );
    }
}

/// Described and zeroed, a counter nothing has bumped is exported at 0 with
/// its help text; a labelled one, for each label set known ahead.
#[test]
fn counters_are_exported_at_zero_with_their_help() {
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
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    // Per-peer series are only known at run time; histograms and gauges
    // appear (with their help) once written.
    assert!(!text.contains("ringkv_hints_stored_total{"), "{text}");
}
