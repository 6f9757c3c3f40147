//! `keygen`, and reading the `--cluster-key-file` every networked command
//! takes (see `ringkv_node::cluster_key`).

use std::io::Write;

use ringkv_node::ClusterKey;

use crate::args::{KeyArgs, KeygenArgs};
use crate::{Exit, Failure};

pub fn keygen(args: KeygenArgs) -> Result<Exit, Failure> {
    let key = ClusterKey::generate().map_err(|e| Failure::new(Exit::Internal, e.to_string()))?;
    let Some(path) = args.out else {
        outln!("{key}");
        return Ok(Exit::Ok);
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path).map_err(|e| {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let why = match (e.kind(), parent) {
            (std::io::ErrorKind::AlreadyExists, _) => {
                "it already exists, and a key file is never overwritten (a cluster's nodes would \
                 stop recognising each other); remove it first to replace the key"
                    .to_string()
            }
            (std::io::ErrorKind::NotFound, Some(parent)) if !parent.is_dir() => {
                let dir = parent.display().to_string();
                // Quoted for the shell when it has to be.
                let plain = dir
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c));
                let arg = if plain {
                    dir.clone()
                } else {
                    format!("'{}'", dir.replace('\'', r"'\''"))
                };
                format!(
                    "the directory {dir} does not exist; create it first (mkdir -p -m 700 {arg})"
                )
            }
            _ => e.to_string(),
        };
        Failure::new(Exit::Usage, format!("--out {}: {why}", path.display()))
    })?;
    if let Err(e) = writeln!(file, "{key}").and_then(|()| file.sync_all()) {
        // Leave no half-written key behind for a node to trip on.
        let _ = std::fs::remove_file(&path);
        return Err(Failure::new(
            Exit::Output,
            format!("--out {}: cannot write the key: {e}", path.display()),
        ));
    }
    errln!(
        "wrote a new cluster key to {}; start every node and client with --cluster-key-file {}",
        path.display(),
        path.display()
    );
    Ok(Exit::Ok)
}

/// The key named by `--cluster-key-file` (or `RINGKV_CLUSTER_KEY_FILE`), if
/// any: read and checked before anything starts or connects.
pub fn load(args: &KeyArgs) -> Result<Option<ClusterKey>, Failure> {
    let (files, named_by) = args.files().map_err(|e| Failure::new(Exit::Usage, e))?;
    ClusterKey::from_files(&files)
        .map_err(|e| Failure::new(Exit::Usage, format!("{named_by}: {e}")))
}
