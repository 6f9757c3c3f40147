//! Helpers shared by this crate's tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Polls `done` every 10 ms; fails naming `what` if it is still false
/// after 20 s (tokio's clock, so paused-time tests advance it too).
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The Rust sources of the workspace's libraries and binary, with their
/// text: for tests that hold something to what the code says.
pub fn workspace_sources() -> Vec<(PathBuf, String)> {
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "src",
        "core/src",
        "ring/src",
        "coordinator/src",
        "repair/src",
        "node/src",
        "bench/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "sources found: {files:?}");
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f, text)
        })
        .collect()
}

/// The arguments of every call of `macro_name` (e.g. `"counter!"`) in
/// `text` outside line comments, up to the call's closing parenthesis.
pub fn macro_calls<'t>(text: &'t str, macro_name: &str) -> Vec<&'t str> {
    let mut calls = Vec::new();
    for (at, _) in text.match_indices(macro_name) {
        // `info!` must not match inside `some_info!`.
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
        if text[line_start..at].contains("//") {
            continue;
        }
        // Not a call: the name in a string, say.
        let Some(rest) = text[at + macro_name.len()..].trim_start().strip_prefix('(') else {
            continue;
        };
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' if depth == 0 => {
                    end = i;
                    break;
                }
                ')' | ']' | '}' => depth -= 1,
                _ => {}
            }
        }
        calls.push(&rest[..end]);
    }
    calls
}
