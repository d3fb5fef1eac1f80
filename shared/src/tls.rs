//! TLS for the queue-proxy's serving port (`QUEUE_SERVING_TLS_PORT`, 8112).
//!
//! Knative opens the TLS port only when both `/var/lib/knative/certs/tls.crt` and
//! `tls.key` exist, requires TLS 1.3 unless `QUEUE_PROXY_TLS_MIN_VERSION` says otherwise,
//! and expects certificates to be picked up again when cert-manager (or Knative's own
//! certificate controller) rotates them on disk. This module turns a cert/key pair into a
//! [`tokio_rustls::TlsAcceptor`] and keeps it current:
//!
//! * [`CertReloader::load`] reads the pair once and fails loudly, so a broken pair stops
//!   the process before any port opens;
//! * [`CertReloader::reload_if_changed`] (polled by [`CertReloader::spawn_watcher`])
//!   re-reads the pair when either file's modification time or length changed. A bad new
//!   pair is logged and ignored, so a half-finished rotation never takes serving down.
//!
//! Each accepted connection takes the acceptor current at that moment; connections that
//! are already established keep the configuration they were handshaken with.

use std::fmt;
use std::fs;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Where Knative mounts the serving certificate when system-internal TLS is enabled.
pub const DEFAULT_CERT_PATH: &str = "/var/lib/knative/certs/tls.crt";
/// Where Knative mounts the serving certificate's private key.
pub const DEFAULT_KEY_PATH: &str = "/var/lib/knative/certs/tls.key";

/// A TLS protocol version accepted in `QUEUE_PROXY_TLS_MIN_VERSION` / `_MAX_VERSION`.
///
/// Only 1.2 and 1.3 exist here: rustls implements nothing older, and Knative's own
/// defaults never go below 1.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

impl TlsVersion {
    fn rustls(self) -> &'static rustls::SupportedProtocolVersion {
        match self {
            TlsVersion::V1_2 => &rustls::version::TLS12,
            TlsVersion::V1_3 => &rustls::version::TLS13,
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        })
    }
}

impl FromStr for TlsVersion {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            _ => Err(TlsError::InvalidVersion {
                value: s.to_owned(),
            }),
        }
    }
}

/// Where the certificate pair lives and which protocol versions to offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub min_version: TlsVersion,
    /// `None` means "the newest this build supports".
    pub max_version: Option<TlsVersion>,
}

impl Default for TlsSettings {
    /// Knative's defaults: the mounted certificate pair, TLS 1.3 minimum, no maximum.
    fn default() -> Self {
        TlsSettings {
            cert_path: PathBuf::from(DEFAULT_CERT_PATH),
            key_path: PathBuf::from(DEFAULT_KEY_PATH),
            min_version: TlsVersion::V1_3,
            max_version: None,
        }
    }
}

/// Why a TLS configuration could not be built.
#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: malformed PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no PEM \"CERTIFICATE\" block found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key (PKCS#1, PKCS#8 or SEC1) found", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error(
        "certificate {} with key {} rejected: {source}",
        cert_path.display(),
        key_path.display()
    )]
    Config {
        cert_path: PathBuf,
        key_path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS minimum version {min} is above the maximum version {max}")]
    VersionRange { min: TlsVersion, max: TlsVersion },
    #[error("unsupported TLS version {value:?}: accepted values are \"1.2\" and \"1.3\"")]
    InvalidVersion { value: String },
}

/// True when both files exist: Knative's condition for opening the TLS port.
pub fn certs_present(cert: &Path, key: &Path) -> bool {
    cert.is_file() && key.is_file()
}

/// What a file looked like when it was last read. Content hashing would be exact, but
/// stat-ing every poll is far cheaper and rotations always change mtime or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> io::Result<Self> {
        // `metadata` follows symlinks, which matters: Kubernetes secret volumes rotate by
        // swapping a `..data` symlink, leaving the `tls.crt` link itself untouched.
        let meta = fs::metadata(path)?;
        Ok(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

type PairStamp = (FileStamp, FileStamp);

struct Inner {
    settings: TlsSettings,
    config: RwLock<Arc<ServerConfig>>,
    /// Stamps of the last pair we *attempted* to load, good or bad. Remembering failed
    /// attempts too keeps a broken pair from being re-parsed and re-logged every poll,
    /// while any further write (e.g. the key arriving after the cert) still retries.
    /// The mutex also serialises concurrent reloads.
    last_seen: Mutex<PairStamp>,
}

/// Holds the current acceptor; reloading swaps it. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct CertReloader {
    inner: Arc<Inner>,
}

impl fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertReloader")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Loads the cert+key now; an unreadable or invalid pair is an error.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let stamps = pair_stamp(&settings)?;
        let config = build_config(&settings)?;
        Ok(CertReloader {
            inner: Arc::new(Inner {
                settings,
                config: RwLock::new(Arc::new(config)),
                last_seen: Mutex::new(stamps),
            }),
        })
    }

    /// The acceptor for the next connection. It owns its own `Arc` of the config, so no
    /// lock is held while the handshake runs.
    pub fn acceptor(&self) -> TlsAcceptor {
        // A poisoned lock still holds a complete `Arc` (the only write is one
        // assignment), so serving on with it is safe.
        let config = self
            .inner
            .config
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// The settings this reloader was loaded with.
    pub fn settings(&self) -> &TlsSettings {
        &self.inner.settings
    }

    /// Re-reads both files if either one's modification time or length changed since the
    /// last attempt. A bad new pair is logged with `warn!` and the old configuration
    /// keeps serving. Returns whether the configuration was swapped.
    pub fn reload_if_changed(&self) -> bool {
        let settings = &self.inner.settings;
        let mut last_seen = self
            .inner
            .last_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);

        let stamps = match pair_stamp(settings) {
            Ok(stamps) => stamps,
            Err(err) => {
                // A file briefly missing mid-rotation is normal; say so only at debug and
                // leave `last_seen` alone so its reappearance is noticed.
                tracing::debug!(error = %err, "TLS certificate pair not readable; keeping the current one");
                return false;
            }
        };
        if stamps == *last_seen {
            return false;
        }
        // Stamps are taken before reading, so a write racing the read shows up as a
        // change on the next poll rather than being lost.
        *last_seen = stamps;

        match build_config(settings) {
            Ok(config) => {
                *self
                    .inner
                    .config
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                tracing::info!(
                    cert = %settings.cert_path.display(),
                    key = %settings.key_path.display(),
                    "reloaded TLS certificate"
                );
                true
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    "new TLS certificate pair is invalid; still serving the previous one"
                );
                false
            }
        }
    }

    /// Spawns a task calling [`reload_if_changed`](Self::reload_if_changed) every
    /// `interval` (production uses 10 s). The task ends by itself once every
    /// `CertReloader` clone is dropped, so it never outlives the server using it.
    pub fn spawn_watcher(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            // A stalled runtime should not produce a burst of back-to-back re-reads.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick fires at once; the pair was just loaded, so skip it.
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                // Blocking file I/O on the runtime thread is acceptable here: two stats
                // (and, rarely, two small reads) from a tmpfs secret volume.
                CertReloader { inner }.reload_if_changed();
            }
        })
    }
}

fn pair_stamp(settings: &TlsSettings) -> Result<PairStamp, TlsError> {
    let stamp = |path: &Path| {
        FileStamp::of(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    Ok((stamp(&settings.cert_path)?, stamp(&settings.key_path)?))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut BufReader::new(pem))
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_owned(),
        })
}

fn protocol_versions(
    settings: &TlsSettings,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, TlsError> {
    let min = settings.min_version;
    let max = settings.max_version.unwrap_or(TlsVersion::V1_3);
    if min > max {
        return Err(TlsError::VersionRange { min, max });
    }
    Ok([TlsVersion::V1_2, TlsVersion::V1_3]
        .into_iter()
        .filter(|v| (min..=max).contains(v))
        .map(TlsVersion::rustls)
        .collect())
}

fn build_config(settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let versions = protocol_versions(settings)?;
    let certs = parse_certs(&settings.cert_path, &read_file(&settings.cert_path)?)?;
    let key = parse_key(&settings.key_path, &read_file(&settings.key_path)?)?;
    let config_err = |source| TlsError::Config {
        cert_path: settings.cert_path.clone(),
        key_path: settings.key_path.clone(),
        source,
    };
    // An explicit provider, so nothing depends on which crypto backend some other crate
    // in the process happened to install as the default.
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&versions)
            .map_err(config_err)?
            .with_no_client_auth()
            // Also verifies the key belongs to the end-entity certificate, so a rotation
            // caught between writing the two files is rejected rather than served.
            .with_single_cert(certs, key)
            .map_err(config_err)?;
    // The TLS port serves the same handler as the plain one, which speaks both.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::UNIX_EPOCH;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsConnector;

    static COUNTER: AtomicU64 = AtomicU64::new(0);

    /// A unique scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "thaw-tls-{}-{}-{}",
                std::process::id(),
                name,
                n
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn cert(&self) -> PathBuf {
            self.0.join("tls.crt")
        }
        fn key(&self) -> PathBuf {
            self.0.join("tls.key")
        }
        fn settings(&self) -> TlsSettings {
            TlsSettings {
                cert_path: self.cert(),
                key_path: self.key(),
                ..TlsSettings::default()
            }
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn new_cert() -> rcgen::CertifiedKey {
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap()
    }

    /// Writes `contents` and sets a never-before-used mtime, because two writes within
    /// the filesystem's timestamp granularity (and of equal length) would otherwise look
    /// unchanged to the reloader.
    fn write_stamped(path: &Path, contents: &[u8]) {
        fs::write(path, contents).unwrap();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = UNIX_EPOCH + Duration::from_secs(1_600_000_000 + n);
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    fn write_pair(dir: &TempDir, ck: &rcgen::CertifiedKey) {
        write_stamped(&dir.cert(), ck.cert.pem().as_bytes());
        write_stamped(&dir.key(), ck.key_pair.serialize_pem().as_bytes());
    }

    fn client_config(
        trust: &[&rcgen::CertifiedKey],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for ck in trust {
            roots.add(ck.cert.der().clone()).unwrap();
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    struct Handshake {
        peer_cert: Vec<u8>,
        alpn: Option<Vec<u8>>,
        version: rustls::ProtocolVersion,
    }

    /// One connection over real TCP: handshake with `reloader.acceptor()`, send "ping",
    /// expect "pong" back.
    async fn handshake(
        reloader: &CertReloader,
        client: Arc<ClientConfig>,
    ) -> Result<Handshake, io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = reloader.acceptor();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            tls.write_all(b"pong").await?;
            tls.shutdown().await?;
            Ok::<_, io::Error>(())
        });

        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let result = async {
            let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
            tls.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"pong");
            let conn = tls.get_ref().1;
            Ok(Handshake {
                peer_cert: conn.peer_certificates().unwrap()[0].to_vec(),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                version: conn.protocol_version().unwrap(),
            })
        }
        .await;
        let server_result = server.await.unwrap();
        if result.is_ok() {
            server_result.unwrap();
        }
        result
    }

    #[tokio::test]
    async fn serves_loaded_cert_over_tls13_with_alpn() {
        let dir = TempDir::new("serve");
        let ck = new_cert();
        write_pair(&dir, &ck);
        let reloader = CertReloader::load(dir.settings()).unwrap();

        let hs = handshake(&reloader, client_config(&[&ck], &[&rustls::version::TLS13]))
            .await
            .unwrap();
        assert_eq!(hs.peer_cert, ck.cert.der().to_vec());
        assert_eq!(hs.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(hs.version, rustls::ProtocolVersion::TLSv1_3);
        // Nothing changed on disk, so nothing to do.
        assert!(!reloader.reload_if_changed());
    }

    #[tokio::test]
    async fn reload_swaps_in_rotated_cert() {
        let dir = TempDir::new("rotate");
        let old = new_cert();
        write_pair(&dir, &old);
        let reloader = CertReloader::load(dir.settings()).unwrap();
        let trusts_old_only = client_config(&[&old], &[&rustls::version::TLS13]);

        let new = new_cert();
        write_pair(&dir, &new);
        assert!(reloader.reload_if_changed());
        assert!(!reloader.reload_if_changed());

        let client = client_config(&[&new], &[&rustls::version::TLS13]);
        let hs = handshake(&reloader, client).await.unwrap();
        assert_eq!(hs.peer_cert, new.cert.der().to_vec());
        assert_ne!(hs.peer_cert, old.cert.der().to_vec());
        // A client trusting only the old cert must now fail.
        let stale = handshake(&reloader, trusts_old_only).await;
        assert!(stale.is_err());
    }

    #[tokio::test]
    async fn acceptor_taken_before_reload_keeps_old_cert() {
        let dir = TempDir::new("inflight");
        let old = new_cert();
        write_pair(&dir, &old);
        let reloader = CertReloader::load(dir.settings()).unwrap();
        let before = reloader.acceptor();

        write_pair(&dir, &new_cert());
        assert!(reloader.reload_if_changed());
        assert!(!Arc::ptr_eq(before.config(), reloader.acceptor().config()));
    }

    #[tokio::test]
    async fn invalid_new_pair_keeps_old_config() {
        let dir = TempDir::new("invalid");
        let old = new_cert();
        write_pair(&dir, &old);
        let reloader = CertReloader::load(dir.settings()).unwrap();
        let client = client_config(&[&old], &[&rustls::version::TLS13]);

        // Garbage in the cert file.
        write_stamped(&dir.cert(), b"this is not a certificate\n");
        assert!(!reloader.reload_if_changed());
        let hs = handshake(&reloader, client.clone()).await.unwrap();
        assert_eq!(hs.peer_cert, old.cert.der().to_vec());

        // A valid cert whose key has not been written yet (rotation caught half-way).
        let next = new_cert();
        write_stamped(&dir.cert(), next.cert.pem().as_bytes());
        assert!(!reloader.reload_if_changed());
        // The same broken pair is not retried every poll.
        assert!(!reloader.reload_if_changed());
        let hs = handshake(&reloader, client).await.unwrap();
        assert_eq!(hs.peer_cert, old.cert.der().to_vec());

        // The key arriving completes the rotation.
        write_stamped(&dir.key(), next.key_pair.serialize_pem().as_bytes());
        assert!(reloader.reload_if_changed());
        let hs = handshake(
            &reloader,
            client_config(&[&next], &[&rustls::version::TLS13]),
        )
        .await
        .unwrap();
        assert_eq!(hs.peer_cert, next.cert.der().to_vec());
    }

    #[tokio::test]
    async fn missing_file_during_rotation_keeps_old_config() {
        let dir = TempDir::new("missing");
        let old = new_cert();
        write_pair(&dir, &old);
        let reloader = CertReloader::load(dir.settings()).unwrap();

        fs::remove_file(dir.key()).unwrap();
        assert!(!reloader.reload_if_changed());
        let client = client_config(&[&old], &[&rustls::version::TLS13]);
        assert!(handshake(&reloader, client).await.is_ok());
    }

    #[tokio::test]
    async fn watcher_picks_up_rotation() {
        let dir = TempDir::new("watch");
        write_pair(&dir, &new_cert());
        let reloader = CertReloader::load(dir.settings()).unwrap();
        let watcher = reloader.spawn_watcher(Duration::from_millis(20));

        let new = new_cert();
        write_pair(&dir, &new);
        let client = client_config(&[&new], &[&rustls::version::TLS13]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(hs) = handshake(&reloader, client.clone()).await {
                assert_eq!(hs.peer_cert, new.cert.der().to_vec());
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "watcher never reloaded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The watcher holds only a weak reference and stops once the reloader is gone.
        drop(reloader);
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("watcher did not stop after the reloader was dropped")
            .unwrap();
    }

    #[tokio::test]
    async fn min_tls13_rejects_tls12_client() {
        let dir = TempDir::new("min13");
        let ck = new_cert();
        write_pair(&dir, &ck);
        let reloader = CertReloader::load(dir.settings()).unwrap();
        let tls12_only = client_config(&[&ck], &[&rustls::version::TLS12]);
        assert!(handshake(&reloader, tls12_only).await.is_err());
    }

    #[tokio::test]
    async fn min_tls12_accepts_tls12_client() {
        let dir = TempDir::new("min12");
        let ck = new_cert();
        write_pair(&dir, &ck);
        let reloader = CertReloader::load(TlsSettings {
            min_version: TlsVersion::V1_2,
            ..dir.settings()
        })
        .unwrap();
        let hs = handshake(&reloader, client_config(&[&ck], &[&rustls::version::TLS12]))
            .await
            .unwrap();
        assert_eq!(hs.version, rustls::ProtocolVersion::TLSv1_2);
        assert_eq!(hs.alpn.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn max_tls12_rejects_tls13_only_client() {
        let dir = TempDir::new("max12");
        let ck = new_cert();
        write_pair(&dir, &ck);
        let reloader = CertReloader::load(TlsSettings {
            min_version: TlsVersion::V1_2,
            max_version: Some(TlsVersion::V1_2),
            ..dir.settings()
        })
        .unwrap();
        let tls13_only = client_config(&[&ck], &[&rustls::version::TLS13]);
        assert!(handshake(&reloader, tls13_only).await.is_err());
    }

    #[test]
    fn min_above_max_is_an_error() {
        let dir = TempDir::new("range");
        write_pair(&dir, &new_cert());
        let err = CertReloader::load(TlsSettings {
            max_version: Some(TlsVersion::V1_2),
            ..dir.settings()
        })
        .unwrap_err();
        assert!(matches!(
            err,
            TlsError::VersionRange {
                min: TlsVersion::V1_3,
                max: TlsVersion::V1_2
            }
        ));
        assert_eq!(
            err.to_string(),
            "TLS minimum version 1.3 is above the maximum version 1.2"
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = TempDir::new("errors");
        let err = CertReloader::load(dir.settings()).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }));
        assert!(err.to_string().contains("tls.crt"), "{err}");

        let ck = new_cert();
        write_stamped(&dir.cert(), ck.cert.pem().as_bytes());
        write_stamped(&dir.key(), ck.cert.pem().as_bytes());
        let err = CertReloader::load(dir.settings()).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }));
        assert!(err.to_string().contains("tls.key"), "{err}");

        write_stamped(&dir.cert(), b"");
        let err = CertReloader::load(dir.settings()).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }));
        assert!(err.to_string().contains("tls.crt"), "{err}");

        // Cert and key from different pairs.
        write_stamped(&dir.cert(), ck.cert.pem().as_bytes());
        write_stamped(&dir.key(), new_cert().key_pair.serialize_pem().as_bytes());
        let err = CertReloader::load(dir.settings()).unwrap_err();
        assert!(matches!(err, TlsError::Config { .. }), "{err}");
    }

    #[test]
    fn tls_version_parsing() {
        assert_eq!("1.2".parse::<TlsVersion>().unwrap(), TlsVersion::V1_2);
        assert_eq!("1.3".parse::<TlsVersion>().unwrap(), TlsVersion::V1_3);
        assert_eq!(TlsVersion::V1_3.to_string(), "1.3");
        assert!(TlsVersion::V1_2 < TlsVersion::V1_3);
        for bad in ["1.1", "", "TLS1.3", "1.4"] {
            let err = TlsVersion::from_str(bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("\"1.2\"") && msg.contains("\"1.3\""), "{msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        }
    }

    #[test]
    fn certs_present_needs_both_files() {
        let dir = TempDir::new("present");
        assert!(!certs_present(&dir.cert(), &dir.key()));
        fs::write(dir.cert(), b"x").unwrap();
        assert!(!certs_present(&dir.cert(), &dir.key()));
        fs::write(dir.key(), b"x").unwrap();
        assert!(certs_present(&dir.cert(), &dir.key()));
        fs::remove_file(dir.cert()).unwrap();
        assert!(!certs_present(&dir.cert(), &dir.key()));
    }

    #[test]
    fn default_settings_match_knative() {
        let s = TlsSettings::default();
        assert_eq!(s.cert_path, Path::new(DEFAULT_CERT_PATH));
        assert_eq!(s.key_path, Path::new(DEFAULT_KEY_PATH));
        assert_eq!(s.min_version, TlsVersion::V1_3);
        assert_eq!(s.max_version, None);
    }
}
