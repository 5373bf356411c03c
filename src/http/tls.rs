//! TLS with rustls (ring provider): PEM loading, the front door's server configuration with a
//! certificate that reloads on SIGHUP or when its files change (open connections keep the
//! key they were handshaken with), client-certificate verification for the node listener,
//! the client configuration for `https://` upstreams, and the node id a certificate proves.
//!
//! TLS 1.2 and 1.3 only; ALPN offers `h2` and `http/1.1`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The one crypto provider: ring (aws-lc-rs is not built).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// Reads a certificate chain and its private key into a key rustls can serve.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = load_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: no usable private key: {e}", key.display()))?;
    let ck = CertifiedKey::from_der(chain, der, &provider())
        .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(ck))
}

/// Reads a CA bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: bad CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// What tells a certificate file's change: its modification time and size, and on Unix
/// its inode and status-change time. Time and size alone miss a renewal of the same size
/// whose modification time was kept (`cp -p`, `rsync -a`, `install -p`) or fell in the same
/// tick of a coarse clock; no one can set the status-change time, and a file renamed into
/// place has another inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: (u64, u64),
    changed: (i64, i64),
}

fn stamp(p: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(p).ok()?;
    #[cfg(unix)]
    let (inode, changed) = {
        use std::os::unix::fs::MetadataExt;
        ((m.dev(), m.ino()), (m.ctime(), m.ctime_nsec()))
    };
    #[cfg(not(unix))]
    let (inode, changed) = ((0, 0), (0, 0));
    Some(Stamp {
        modified: m.modified().ok()?,
        len: m.len(),
        inode,
        changed,
    })
}

/// The front door's certificate: swapped atomically on reload; each handshake takes the
/// current one, and connections already open are untouched.
#[derive(Debug)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    stamps: Mutex<[Option<Stamp>; 2]>,
}

impl CertReloader {
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<CertReloader>, String> {
        let stamps = [stamp(cert), stamp(key)];
        Ok(Arc::new(CertReloader {
            current: ArcSwap::new(load_certified_key(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            stamps: Mutex::new(stamps),
        }))
    }

    /// Loads the files again. On error the old certificate stays in service.
    pub fn reload(&self) -> Result<(), String> {
        let stamps = [stamp(&self.cert), stamp(&self.key)];
        let ck = load_certified_key(&self.cert, &self.key)?;
        self.current.store(ck);
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        Ok(())
    }

    /// Reloads if either file changed (its `Stamp`); `Ok(true)` if it did.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = [stamp(&self.cert), stamp(&self.key)];
        if *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        self.reload().map(|_| true)
    }

    /// The certificate handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Reloads on SIGHUP and whenever the files change (checked every `interval`), until
    /// `stop` resolves.
    pub fn watch(
        self: Arc<Self>,
        interval: Duration,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        // Registered before this returns (and so before any listener serves), not when the
        // task first runs: until then SIGHUP's default action would end the process.
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(
                |e| tracing::warn!(error = %e, "no SIGHUP handler: reload on file change only"),
            )
            .ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(stop);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let r = tokio::select! {
                    _ = &mut stop => return,
                    _ = tick.tick() => self.reload_if_changed(),
                    _ = hangup => self.reload().map(|_| true),
                };
                match r {
                    Ok(true) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate reload failed; keeping the old one")
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The server configuration: TLS 1.2+, ALPN h2 and http/1.1, the reloading certificate, and
/// with `client_roots` a required client certificate chaining to them.
pub fn server_config(
    certs: Arc<CertReloader>,
    client_roots: Option<RootCertStore>,
) -> Result<Arc<ServerConfig>, String> {
    let b = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?;
    let b = match client_roots {
        None => b.with_no_client_auth(),
        Some(roots) => {
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("client CA bundle: {e}"))?;
            b.with_client_cert_verifier(v)
        }
    };
    let mut cfg = b.with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The client configuration for `https://` upstreams: trusts exactly `roots` (empty: none).
pub fn client_config(roots: RootCertStore) -> Result<ClientConfig, String> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Whether a (chain-verified) client certificate names `node_id` in its SAN: a DNS name
/// equal to it byte for byte. Not the matching a server name gets (webpki folds ASCII
/// case, takes a name with a trailing dot and expands wildcards), because node ids are
/// compared exactly: a certificate for `node-a` must not act as `NODE-A`, `node-a.` or,
/// through `*.nodes.example`, as every node under it.
pub fn cert_names_node(cert: &CertificateDer<'_>, node_id: &str) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName(d) if *d == node_id))
}
