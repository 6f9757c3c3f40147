//! Every TLS decision in one place.
//!
//! QUIC requires TLS 1.3. How a connection is authenticated depends on
//! whether the cluster has a key (`--cluster-key-file`, see
//! [`crate::cluster_key`]):
//!
//! - **With a key**, every process makes a certificate of its own, signed by
//!   the certificate authority derived from the key, and both ends verify the
//!   other's against that authority (mutual TLS). A node refuses a
//!   connection from any process that does not hold the key, and a client
//!   refuses a node that does not: before any request is read or sent.
//! - **Without one**, each node makes a self-signed certificate and peers do
//!   not check who signed it. The handshake's signatures are still verified,
//!   so the channel is encrypted and integrity-protected, but anyone who
//!   reaches the port can talk to the node. That is the default, for a
//!   cluster on one machine or a trusted network.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use ringkv_core::wire::ALPN;

use crate::cluster_key::ClusterKey;
use crate::error::NodeError;

/// The name every node's certificate carries and every client asks for.
pub const SERVER_NAME: &str = "ringkv";

/// How long a connection may stay silent before it is considered dead. Keep-
/// alives keep healthy idle connections open well inside this. It also bounds
/// a handshake: a connect timeout longer than this never takes effect, so the
/// CLI caps `--connect-timeout-ms` at it. (A node's side of a handshake is
/// cut shorter still, at `server::HANDSHAKE_TIMEOUT` from its first packet.)
pub const IDLE_TIMEOUT_MS: u64 = 10_000;
const IDLE_TIMEOUT: Duration = Duration::from_millis(IDLE_TIMEOUT_MS);
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Concurrent requests one connection may carry: bounds a peer's load (and
/// the frames buffered for it) on us.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 256;
/// The most a peer may have sent on a connection that the node has not
/// yet read, over all its streams. quinn's default is unbounded: 256
/// streams, each with a 1.25 MB window, whose requests are held back
/// (request memory full, answers unread) buffer 320 MB per connection,
/// charged to nothing. Large bodies still flow: the window refills as the
/// node reads them.
const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_CONCURRENT_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.receive_window(CONNECTION_RECEIVE_WINDOW_BYTES.into());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("10 s is a valid idle timeout"),
    ));
    Arc::new(t)
}

/// This process's certificate and key: signed by the cluster's authority
/// when there is a key, self-signed otherwise.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The cluster's authority, which peers' certificates must chain to.
    roots: Option<Arc<RootCertStore>>,
}

impl Identity {
    fn new(cluster_key: Option<&ClusterKey>) -> Result<Identity, NodeError> {
        let key_pair = KeyPair::generate().map_err(tls_err)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(tls_err)?;
        let Some(cluster_key) = cluster_key else {
            let cert = params.self_signed(&key_pair).map_err(tls_err)?;
            return Ok(Identity {
                chain: vec![cert.der().clone()],
                key,
                roots: None,
            });
        };
        // One certificate for both ends of a connection: nodes are servers to
        // their clients and clients of their peers.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let authorities = cluster_key.authorities().map_err(tls_err)?;
        let presented = &authorities[0];
        let cert = params
            .signed_by(&key_pair, &presented.cert, &presented.key)
            .map_err(tls_err)?;
        let mut roots = RootCertStore::empty();
        for authority in &authorities {
            roots.add(authority.cert.der().clone()).map_err(tls_err)?;
        }
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key,
            roots: Some(Arc::new(roots)),
        })
    }
}

fn tls_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Tls {
        reason: e.to_string(),
    }
}

/// The server side. With a cluster key, clients must present a certificate
/// signed by the cluster's authority.
pub fn server_config(cluster_key: Option<&ClusterKey>) -> Result<quinn::ServerConfig, NodeError> {
    let provider = provider();
    let identity = Identity::new(cluster_key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?;
    let builder = match identity.roots {
        Some(roots) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(tls_err)?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// The client side, used by peers and by the `ringkv` client commands. With
/// a cluster key, the node's certificate must be signed by the cluster's
/// authority, and this side presents one of its own.
pub fn client_config(cluster_key: Option<&ClusterKey>) -> Result<quinn::ClientConfig, NodeError> {
    let provider = provider();
    let identity = Identity::new(cluster_key)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?;
    let mut tls = match identity.roots {
        Some(roots) => builder
            .with_webpki_verifier(
                WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(tls_err)?,
            )
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(tls_err)?,
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// A TLS alert's code inside a QUIC error code (RFC 9001 §4.8).
const CRYPTO_ERROR_FIRST: u64 = 0x100;
const ALERT_CERTIFICATE_REQUIRED: u64 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u64 = 120;
/// The alerts a failed certificate check sends (RFC 8446 §6.2): bad,
/// unknown, or from an unknown CA, or a signature that does not verify.
const CERTIFICATE_ALERTS: [u64; 4] = [42, 46, 48, 51];

/// When a TLS alert ended the connection, says so and what to do about it:
/// the usual cause is a cluster key that one end lacks or holds differently.
/// `None` for every other way a connection ends.
pub fn handshake_failure(e: &quinn::ConnectionError) -> Option<String> {
    let (code, we_refused) = match e {
        quinn::ConnectionError::TransportError(t) => (u64::from(t.code), true),
        quinn::ConnectionError::ConnectionClosed(c) => (u64::from(c.error_code), false),
        _ => return None,
    };
    let alert = code
        .checked_sub(CRYPTO_ERROR_FIRST)
        .filter(|alert| *alert <= 0xff)?;
    let certificate = CERTIFICATE_ALERTS.contains(&alert);
    let advice = match (alert, we_refused) {
        (ALERT_NO_APPLICATION_PROTOCOL, _) => format!(
            "the other end speaks another version of the ringkv protocol (this one speaks {}); run one ringkv release throughout the cluster",
            String::from_utf8_lossy(ALPN)
        ),
        (ALERT_CERTIFICATE_REQUIRED, false) => "the node requires the cluster key: give the cluster's key file with --cluster-key-file (or RINGKV_CLUSTER_KEY_FILE)".into(),
        // Without a key this end accepts any certificate, so a failed check
        // here means it has one that the node's certificate does not match.
        (_, true) if certificate => "the node's certificate is not signed by this cluster key: it runs without --cluster-key-file, or with another key".into(),
        (_, false) if certificate => "the node refused this process's certificate: it was made from another cluster key".into(),
        _ => "check that both ends run the same ringkv release with the same cluster key".into(),
    };
    Some(format!("{e}; {advice}"))
}

/// Accepts any server certificate but still checks the handshake signature
/// against it: a cluster without a key.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
