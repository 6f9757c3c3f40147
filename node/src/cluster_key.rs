//! The cluster key: who may talk to a cluster.
//!
//! Dynamo assumes a trusted environment (the paper's §4.7: "no security
//! related requirements such as authentication and authorization"). A store
//! that people run on shared networks cannot: without a check, anything that
//! reaches a node's UDP port could send it replica writes or ask it to remove
//! a member. The cluster key is the check.
//!
//! The key is one shared secret of at least [`CLUSTER_KEY_BYTES_MIN`] bytes,
//! written as hex (`ringkv keygen`). Every node, and every client allowed
//! in, derives the same certificate authority from it: an Ed25519 key pair
//! whose seed is HKDF-SHA256 of the secret. Each process then makes a
//! certificate of its own, signed by that authority, and both sides of every
//! connection verify the other's against it (mutual TLS, see `tls`). So the
//! secret never crosses the network, no CA files have to be copied around,
//! and a process without the key (or with another) fails the handshake
//! before any request is read.
//!
//! A process may hold more than one key: it proves that it holds the first
//! and accepts others that prove any of them. That is how a key is changed
//! without stopping the cluster: restart every process with `new` accepted
//! after its `old` key, then with `new` first and `old` after it, then with
//! `new` alone (`ringkv node --help` spells it out). At every step each
//! process accepts the key every other one presents.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::PrivatePkcs8KeyDer;

/// The shortest secret accepted: 32 bytes, 64 hex digits.
pub const CLUSTER_KEY_BYTES_MIN: usize = 32;
/// The longest: a key file is read whole, so it is bounded.
pub const CLUSTER_KEY_BYTES_MAX: usize = 512;
/// Bytes of a key that [`ClusterKey::generate`] makes.
const GENERATED_BYTES: usize = 32;
/// Separates this derivation from any other use of the same secret; the
/// version changes if the derivation ever does.
const DERIVATION_SALT: &[u8] = b"ringkv cluster CA v1";
const DERIVATION_INFO: &[u8] = b"ed25519 seed";
/// PKCS#8 v1 (RFC 8410) of an Ed25519 private key, before its 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The authority's name; every process derives the same one, since a peer's
/// certificate names its issuer by it.
const AUTHORITY_NAME: &str = "ringkv cluster authority";
/// What a key's fingerprint is the HMAC of.
const FINGERPRINT_LABEL: &[u8] = b"ringkv cluster key fingerprint v1";

/// A cluster's shared secret, or several while the key is being changed:
/// the first is presented, all are accepted. `Debug` does not print them.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey {
    /// Never empty.
    secrets: Arc<[Arc<[u8]>]>,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<secret>)")
    }
}

/// The certificate authority every holder of one key derives alike.
pub(crate) struct Authority {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

/// The variable that names the key files when `--cluster-key-file` is not
/// given.
pub const CLUSTER_KEY_FILE_ENV: &str = "RINGKV_CLUSTER_KEY_FILE";

/// The key files a command reads, and what named them (for errors): the
/// `--cluster-key-file` values (`flags`) as given, a comma being part of a
/// path, or else the value of [`CLUSTER_KEY_FILE_ENV`] (`variable`) split
/// at commas. The variable set but empty, naming an empty path, or not
/// UTF-8 is an error rather than no key: a deployment whose template left
/// it blank must not run open by accident.
pub fn key_files(
    flags: &[std::path::PathBuf],
    variable: Option<std::ffi::OsString>,
) -> Result<(Vec<std::path::PathBuf>, &'static str), String> {
    if !flags.is_empty() {
        return Ok((flags.to_vec(), "--cluster-key-file"));
    }
    let Some(value) = variable else {
        return Ok((Vec::new(), CLUSTER_KEY_FILE_ENV));
    };
    let Some(value) = value.to_str() else {
        return Err(format!(
            "{CLUSTER_KEY_FILE_ENV} is not UTF-8: give a key file whose path is not with --cluster-key-file"
        ));
    };
    if value.is_empty() {
        return Err(format!(
            "{CLUSTER_KEY_FILE_ENV} is set but empty: name the key file, or unset it to run without a key"
        ));
    }
    let mut files = Vec::new();
    for part in value.split(',') {
        if part.is_empty() {
            return Err(format!(
                "{CLUSTER_KEY_FILE_ENV} ({value}) names an empty path: separate key files with single commas"
            ));
        }
        files.push(std::path::PathBuf::from(part));
    }
    Ok((files, CLUSTER_KEY_FILE_ENV))
}

impl ClusterKey {
    /// Parses a key as `ringkv keygen` writes it: hex digits, surrounding
    /// white space ignored. The error says what is wrong, never the key.
    pub fn parse(text: &str) -> Result<ClusterKey, String> {
        let hex = text.trim();
        if hex.is_empty() {
            return Err("it is empty; make a key with `ringkv keygen`".into());
        }
        // The position only: the file may hold some other secret by mistake.
        if let Some(at) = hex.chars().position(|c| !c.is_ascii_hexdigit()) {
            return Err(format!(
                "expected hex digits only, found something else at character {}; make a key with `ringkv keygen`",
                at + 1
            ));
        }
        if !hex.len().is_multiple_of(2) {
            return Err(format!(
                "expected an even number of hex digits, found {}",
                hex.len()
            ));
        }
        let bytes = hex.len() / 2;
        if bytes < CLUSTER_KEY_BYTES_MIN {
            return Err(format!(
                "the key has {bytes} bytes; at least {CLUSTER_KEY_BYTES_MIN} are needed ({} hex digits); make one with `ringkv keygen`",
                CLUSTER_KEY_BYTES_MIN * 2
            ));
        }
        if bytes > CLUSTER_KEY_BYTES_MAX {
            return Err(format!(
                "the key has {bytes} bytes; at most {CLUSTER_KEY_BYTES_MAX} are accepted"
            ));
        }
        let secret: Vec<u8> = hex
            .as_bytes()
            .chunks(2)
            .map(|pair| (hex_value(pair[0]) << 4) | hex_value(pair[1]))
            .collect();
        Ok(ClusterKey {
            secrets: Arc::new([Arc::from(secret)]),
        })
    }

    /// This key, accepting `other`'s processes too (while a cluster changes
    /// from one key to the other). `self` stays the key presented.
    pub fn also_accepting(&self, other: &ClusterKey) -> ClusterKey {
        let mut secrets: Vec<Arc<[u8]>> = self.secrets.to_vec();
        for secret in other.secrets.iter() {
            if !secrets.contains(secret) {
                secrets.push(secret.clone());
            }
        }
        ClusterKey {
            secrets: secrets.into(),
        }
    }

    /// Reads key files: the first is presented, all are accepted. `None`
    /// when `paths` is empty.
    pub fn from_files(
        paths: &[std::path::PathBuf],
    ) -> Result<Option<ClusterKey>, crate::NodeError> {
        let mut key: Option<ClusterKey> = None;
        for path in paths {
            let next = ClusterKey::from_file(path)?;
            key = Some(match key {
                None => next,
                Some(key) => key.also_accepting(&next),
            });
        }
        Ok(key)
    }

    /// Reads and parses a key file. A file that others can read is used, with
    /// a warning: the key is as secret as the data it guards.
    pub fn from_file(path: &Path) -> Result<ClusterKey, crate::NodeError> {
        let bad = |reason: String| crate::NodeError::ClusterKey {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        // Hex of the longest key, a line end and some white space.
        if meta.len() > (CLUSTER_KEY_BYTES_MAX as u64) * 2 + 64 {
            return Err(bad(format!(
                "{} bytes long; a key file holds one key of at most {} hex digits",
                meta.len(),
                CLUSTER_KEY_BYTES_MAX * 2
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read it as text: {e}")))?;
        let key = ClusterKey::parse(&text).map_err(bad)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "the cluster key file can be read by other users; chmod 600 it"
                );
            }
        }
        Ok(key)
    }

    /// A fresh key from the operating system's random source, as hex.
    pub fn generate() -> Result<String, crate::NodeError> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; GENERATED_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| crate::NodeError::Tls {
                reason: "the operating system's random source failed".into(),
            })?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A short, one-way fingerprint of each key held (HMAC-SHA-256 keyed by
    /// the key, of a fixed label; 16 bytes as hex), for the data dir to
    /// remember which keys its node ran with without holding them.
    pub fn fingerprints(&self) -> Vec<String> {
        self.secrets
            .iter()
            .map(|secret| {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                let tag = ring::hmac::sign(&key, FINGERPRINT_LABEL);
                tag.as_ref()[..16]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            })
            .collect()
    }

    /// The certificate authority of each key held, the presented key's
    /// first: the same certificate and key for every holder of a key.
    pub(crate) fn authorities(&self) -> Result<Vec<Authority>, rcgen::Error> {
        self.secrets.iter().map(|s| authority(s)).collect()
    }
}

/// The certificate authority derived from one secret.
fn authority(secret: &[u8]) -> Result<Authority, rcgen::Error> {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, DERIVATION_SALT);
    let mut seed = [0u8; 32];
    salt.extract(secret)
        .expand(&[DERIVATION_INFO], ring::hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut seed))
        .expect("32 bytes is HKDF-SHA256's own length");
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&seed);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8),
        &rcgen::PKCS_ED25519,
    )?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, AUTHORITY_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(Authority { cert, key })
}

/// The value of one ASCII hex digit (checked by the caller).
fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    /// The authority's Ed25519 public key for `KEY`, computed apart from this
    /// code: HKDF-SHA256 (RFC 5869) with Python's `hmac`, and the public key
    /// of that seed with Python's `cryptography` package.
    const PINNED_PUBLIC_KEY: &str =
        "a0c67e7717021817dceaaf92dc0e4d24328121b6827ec0b0464c941110cd08e7";

    #[test]
    fn a_generated_key_parses_and_differs_from_the_next() {
        let (a, b) = (
            ClusterKey::generate().unwrap(),
            ClusterKey::generate().unwrap(),
        );
        assert_eq!(a.len(), GENERATED_BYTES * 2);
        assert_ne!(a, b);
        assert!(ClusterKey::parse(&a).is_ok());
    }

    #[test]
    fn parsing_ignores_surrounding_white_space_and_case() {
        let plain = ClusterKey::parse(KEY).unwrap();
        assert_eq!(
            ClusterKey::parse(&format!("  {}\n", KEY.to_uppercase())).unwrap(),
            plain
        );
        assert_eq!(plain.secrets[0][..3], [0x00, 0x11, 0x22]);
        assert_eq!(plain.secrets[0].len(), 32);
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason_and_never_echoed() {
        let cases = [
            ("", "empty"),
            ("  \n", "empty"),
            (&KEY[..62], "31 bytes; at least 32"),
            (&KEY[..63], "even number"),
            (
                "correct horse battery staple correct horse battery staple x",
                "hex digits only, found something else at character 2",
            ),
        ];
        for (text, expected) in cases {
            let e = ClusterKey::parse(text).unwrap_err();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
        let long = "ab".repeat(CLUSTER_KEY_BYTES_MAX + 1);
        assert!(ClusterKey::parse(&long).unwrap_err().contains("at most"));
        let e = ClusterKey::parse(&format!("{KEY}zz")).unwrap_err();
        assert!(!e.contains(KEY), "{e}");
        assert_eq!(
            format!("{:?}", ClusterKey::parse(KEY).unwrap()),
            "ClusterKey(<secret>)"
        );
    }

    /// Every release must derive the same authority from a key, or nodes of
    /// two releases would refuse each other: the public key is pinned (the
    /// name is a constant).
    #[test]
    fn the_derivation_is_pinned() {
        let authority = authority(&ClusterKey::parse(KEY).unwrap().secrets[0]).unwrap();
        let public: String = rcgen::PublicKeyData::der_bytes(&authority.key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(public, PINNED_PUBLIC_KEY);
    }

    /// Two processes with one key must derive the same authority (a peer's
    /// certificate is checked against the one derived locally); another key
    /// must give another.
    #[test]
    fn one_key_derives_one_authority() {
        let key = ClusterKey::parse(KEY).unwrap();
        let (a, b) = (
            authority(&key.secrets[0]).unwrap(),
            authority(&key.secrets[0]).unwrap(),
        );
        assert_eq!(a.key.public_key_raw(), b.key.public_key_raw());
        let other = ClusterKey::parse(&KEY.replace("ff", "fe")).unwrap();
        assert_ne!(
            authority(&other.secrets[0]).unwrap().key.public_key_raw(),
            a.key.public_key_raw()
        );
    }

    #[test]
    fn a_key_accepting_another_presents_itself_and_accepts_both() {
        let (a, b) = (
            ClusterKey::parse(KEY).unwrap(),
            ClusterKey::parse(&KEY.replace("ff", "fe")).unwrap(),
        );
        let both = a.also_accepting(&b);
        assert_eq!(both.secrets.len(), 2);
        assert_eq!(both.secrets[0], a.secrets[0]);
        let presented = &both.authorities().unwrap()[0];
        assert_eq!(
            presented.key.public_key_raw(),
            authority(&a.secrets[0]).unwrap().key.public_key_raw()
        );
        // Accepting a key already held adds nothing.
        assert_eq!(both.also_accepting(&a), both);
        assert_ne!(b.also_accepting(&a), both);
    }

    #[test]
    fn key_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        std::fs::write(&path, format!("{KEY}\n")).unwrap();
        assert_eq!(
            ClusterKey::from_file(&path).unwrap(),
            ClusterKey::parse(KEY).unwrap()
        );
        let missing = dir.path().join("missing.key");
        let e = ClusterKey::from_file(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing.key") && e.contains("cannot read"),
            "{e}"
        );
        let e = ClusterKey::from_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let other = dir.path().join("other.key");
        std::fs::write(&other, KEY.replace("ff", "fe")).unwrap();
        let both = ClusterKey::from_files(&[path.clone(), other.clone()])
            .unwrap()
            .unwrap();
        assert_eq!(
            both,
            ClusterKey::from_file(&path)
                .unwrap()
                .also_accepting(&ClusterKey::from_file(&other).unwrap())
        );
        assert_eq!(ClusterKey::from_files(&[]).unwrap(), None);
        let e = ClusterKey::from_files(&[path.clone(), missing.clone()]).unwrap_err();
        assert!(e.to_string().contains("missing.key"), "{e}");
        std::fs::write(&path, "x".repeat(5000)).unwrap();
        let e = ClusterKey::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("5000 bytes long"), "{e}");
        std::fs::write(&path, "abcd").unwrap();
        let e = ClusterKey::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("cluster.key") && e.contains("2 bytes"), "{e}");
    }
}
