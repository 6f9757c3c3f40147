//! A cluster with a key, end to end: `ringkv keygen` makes the key file,
//! real nodes started with it serve the clients that hold it, and every
//! other client is refused with an exit status and a message that says why.

mod common;

use common::*;

fn keygen(path: &std::path::Path) -> std::process::Output {
    run(ringkv().arg("keygen").arg("--out").arg(path))
}

#[test]
fn keygen_writes_a_private_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.key");
    let o = keygen(&path);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("--cluster-key-file"), "{}", stderr(&o));
    let key = std::fs::read_to_string(&path).unwrap();
    assert_eq!(key.trim().len(), 64, "{key:?}");
    assert!(key.trim().chars().all(|c| c.is_ascii_hexdigit()), "{key:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // A second keygen must not replace the key a cluster runs with.
    let o = keygen(&path);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), key);
    // A directory that is not there is named, with what to do.
    let missing = dir.path().join("etc-ringkv");
    let o = keygen(&missing.join("cluster.key"));
    assert_exit(&o, 2);
    let said = stderr(&o);
    assert!(
        said.contains(&format!(
            "the directory {} does not exist",
            missing.display()
        )) && said.contains("mkdir -p"),
        "{said}"
    );
    assert!(!missing.exists());
    // To stdout: a fresh key each time.
    let o = run(ringkv().arg("keygen"));
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim().len(), 64);
    assert_ne!(stdout(&o), key);
}

#[test]
fn a_keyed_cluster_serves_key_holders_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let (key, other, short) = (
        dir.path().join("cluster.key"),
        dir.path().join("other.key"),
        dir.path().join("short.key"),
    );
    assert_exit(&keygen(&key), 0);
    assert_exit(&keygen(&other), 0);
    std::fs::write(&short, "abcd\n").unwrap();
    let key_s = key.to_str().unwrap();
    let c = Cluster::start(
        "a_keyed_cluster_serves_key_holders_and_refuses_others",
        2,
        2,
        &["--cluster-key-file", key_s],
    );

    // W=all: the nodes replicate to each other over their keyed link.
    assert_exit(
        &c.cli(
            0,
            &["put", "k", "v", "-w", "all", "--cluster-key-file", key_s],
        ),
        0,
    );
    let o = c.cli(1, &["get", "k", "--json", "--cluster-key-file", key_s]);
    assert_exit(&o, 0);
    assert_eq!(values(&o), vec!["v".to_string()]);
    // The key can come from the environment too.
    let o = run(ringkv()
        .args(["status", "--node", &c.addr(0)])
        .env("RINGKV_CLUSTER_KEY_FILE", &key));
    assert_exit(&o, 0);
    // Set but blank, it is an error naming it, not a run without a key.
    let o = run(ringkv()
        .args(["status", "--node", &c.addr(0)])
        .env("RINGKV_CLUSTER_KEY_FILE", ""));
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("RINGKV_CLUSTER_KEY_FILE is set but empty"),
        "{}",
        stderr(&o)
    );
    // Several keys: the first is presented, every one accepted. So the
    // cluster's key first works, and another key first does not.
    let o = run(ringkv()
        .args(["status", "--node", &c.addr(0), "--cluster-key-file", key_s])
        .arg("--cluster-key-file")
        .arg(&other));
    assert_exit(&o, 0);
    let o = run(ringkv().args(["status", "--node", &c.addr(0)]).env(
        "RINGKV_CLUSTER_KEY_FILE",
        format!("{},{key_s}", other.display()),
    ));
    assert_exit(&o, 4);

    let o = c.cli(0, &["get", "k"]);
    assert_exit(&o, 4);
    assert!(
        stderr(&o).contains("requires the cluster key"),
        "{}",
        stderr(&o)
    );
    let o = c.cli(1, &["put", "k", "x", "-w", "1"]);
    assert_exit(&o, 4);
    let o = c.cli(
        0,
        &[
            "put",
            "k",
            "x",
            "--cluster-key-file",
            other.to_str().unwrap(),
        ],
    );
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("cluster key"), "{}", stderr(&o));
    let o = c.cli(
        0,
        &["get", "k", "--cluster-key-file", short.to_str().unwrap()],
    );
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("short.key") && stderr(&o).contains("2 bytes"),
        "{}",
        stderr(&o)
    );
    // The refused puts wrote nothing.
    let o = c.cli(
        1,
        &[
            "get",
            "k",
            "-r",
            "all",
            "--json",
            "--cluster-key-file",
            key_s,
        ],
    );
    assert_eq!(values(&o), vec!["v".to_string()]);

    // The bench's clients and its staleness prober hold the key too.
    let cluster = format!("{},{}", c.addr(0), c.addr(1));
    let o = run(ringkv()
        .args([
            "bench",
            "--cluster",
            &cluster,
            "--workload",
            "c",
            "--records",
            "20",
        ])
        .args([
            "--duration-s",
            "1",
            "--consistency",
            "1",
            "--concurrency",
            "2",
        ])
        .args(["--json", "-", "--cluster-key-file", key_s]));
    assert_exit(&o, 0);
    let report = json(&o);
    let read = &report["settings"][0]["ops"]["read"];
    assert!(read["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(read["errors"], 0, "{report}");
    // With another key it stops before it loads anything.
    let o = run(ringkv()
        .args([
            "bench",
            "--cluster",
            &cluster,
            "--records",
            "10",
            "--duration-s",
            "1",
        ])
        .arg("--cluster-key-file")
        .arg(&other));
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("cluster key"), "{}", stderr(&o));

    // A node without the key cannot join, and says why; nor can a node start
    // with a key file that is not there.
    let ip = loopback_for("a_keyed_cluster_serves_key_holders_and_refuses_others");
    let n3 = |flags: &[&str]| {
        run(ringkv()
            .args([
                "node",
                "--id",
                "n3",
                "--listen",
                &format!("{ip}:{}", free_port(ip)),
            ])
            .args(flags)
            .arg("--data-dir")
            .arg(dir.path().join("n3")))
    };
    let o = n3(&["--seed", &c.addr(0)]);
    assert_exit(&o, 4);
    assert!(
        stderr(&o).contains("requires the cluster key"),
        "{}",
        stderr(&o)
    );
    let o = n3(&["--cluster-key-file", "/nonexistent/cluster.key"]);
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("/nonexistent/cluster.key"),
        "{}",
        stderr(&o)
    );
}
