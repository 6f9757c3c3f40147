//! Checks of the workspace's sources that no type can express.

use crate::test_support::{macro_calls, workspace_sources};

/// `--log-format json` writes an event's fields beside its own `timestamp`,
/// `level`, `message` and `target` keys, so a field of one of those names
/// makes a line with a key twice, and collectors keep one (or refuse the
/// line). Fields are what comes before an event's message string.
#[test]
fn no_log_event_has_a_field_named_like_the_json_log_s_own_keys() {
    const RESERVED: [&str; 4] = ["timestamp", "level", "message", "target"];
    let mut events = 0;
    for (file, text) in workspace_sources() {
        for macro_name in ["error!", "warn!", "info!", "debug!", "trace!"] {
            for args in macro_calls(&text, macro_name) {
                events += 1;
                // Fields come before the message; a string literal ends them.
                let fields = args.split('"').next().unwrap_or("");
                for field in fields.split(',') {
                    let name = field
                        .split('=')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .trim_start_matches(['%', '?']);
                    // `target:` sets the event's target, a key of its own.
                    assert!(
                        !RESERVED.contains(&name),
                        "{}: a log field named `{name}` in {macro_name}({args})",
                        file.display()
                    );
                }
            }
        }
    }
    assert!(events > 50, "log events found: {events}");
}
