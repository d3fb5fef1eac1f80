//! The webhook's serving certificate: made here (a CA and a serving certificate it signs,
//! for the names the API server dials), or taken from PEM someone else made; checked the
//! way a client would check it; and turned into the rustls configuration each TLS
//! connection is accepted with.
//!
//! A CA is made rather than one self-signed serving certificate because the API server
//! trusts whatever `caBundle` says: with a CA there, the serving certificate can be
//! renewed (signed again by the same CA) without touching the webhook configuration.

use std::io::BufReader;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{RootCertStore, ServerConfig};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// How long a CA made here lasts. Long, because changing it means rewriting `caBundle`.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a serving certificate made here lasts; it is renewed well before.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A certificate that would not be valid this far ahead is renewed now.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start this long before they are made, for clocks a little behind ours.
const BACKDATE: Duration = Duration::from_secs(3600);
/// The subject of every CA made here. A stored CA is rebuilt as an issuer from its key
/// and this name, so the name must never change.
const CA_NAME: &str = "thaw-webhook-ca";

/// Why a certificate could not be made, read or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("cannot make a certificate: {0}")]
    Generate(String),
    #[error("{what}: malformed PEM: {reason}")]
    Pem { what: String, reason: String },
    #[error("{what}: no PEM \"CERTIFICATE\" block")]
    NoCertificate { what: String },
    #[error("{what}: no PEM private key (PKCS#1, PKCS#8 or SEC1)")]
    NoPrivateKey { what: String },
    #[error("the certificate and key cannot serve TLS: {0}")]
    Config(String),
    #[error("the certificate is not valid for {name} {when}: {reason}")]
    Invalid {
        name: String,
        when: String,
        reason: String,
    },
}

/// The DNS names the API server may dial a Service by: `<svc>`, `<svc>.<ns>`,
/// `<svc>.<ns>.svc` (what it actually uses) and `<svc>.<ns>.svc.cluster.local`.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A serving certificate chain and its key, and the CA(s) that vouch for it, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// What goes in `caBundle`: one CA, or during a CA change the new one first and the
    /// old one after it. `None` when the certificate came without its CA.
    pub ca_pem: Option<String>,
    /// The CA's private key, when this webhook made the CA and may sign with it again.
    pub ca_key_pem: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Bundle {
    /// A new CA and a serving certificate for `names` signed by it.
    pub fn generate(names: &[String], now: SystemTime) -> Result<Self, CertError> {
        Authority::generate(now)?.issue(names, now, None)
    }

    /// The rustls configuration serving this certificate. The key must belong to the
    /// certificate (rustls checks), so a mismatched pair never gets as far as serving.
    pub fn server_config(&self) -> Result<ServerConfig, CertError> {
        let certs = parse_certs("tls.crt", &self.cert_pem)?;
        let key = parse_key("tls.key", &self.key_pem)?;
        // An explicit provider, so nothing depends on which crypto backend another crate
        // in the process installed as the default.
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| CertError::Config(e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| CertError::Config(e.to_string()))?;
        // The API server speaks HTTP/2 to webhooks when offered, else HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Checks, as the API server will, that the chain leads to `ca_pem` and is valid for
    /// every one of `names` at `at`. A bundle without a CA cannot be checked and passes.
    pub fn check(&self, names: &[String], at: SystemTime) -> Result<(), CertError> {
        let Some(ca_pem) = &self.ca_pem else {
            return Ok(());
        };
        let when = || format!("at {}", rfc3339(at));
        // Only CAs valid at `at` are trusted: rustls-webpki takes trust anchors as
        // timeless, but the API server (Go's crypto/x509) refuses an expired CA.
        let mut roots = RootCertStore::empty();
        let at_time = OffsetDateTime::from(at);
        for ca in parse_certs("ca.crt", ca_pem)? {
            let (not_before, not_after) = validity(&ca).map_err(|reason| CertError::Pem {
                what: "ca.crt".into(),
                reason,
            })?;
            if at_time < not_before || at_time > not_after {
                continue;
            }
            roots.add(ca).map_err(|e| CertError::Invalid {
                name: "ca.crt".into(),
                when: when(),
                reason: e.to_string(),
            })?;
        }
        if roots.is_empty() {
            return Err(CertError::Invalid {
                name: "ca.crt".into(),
                when: when(),
                reason: "no CA in it is valid then".into(),
            });
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| CertError::Config(e.to_string()))?;
        let chain = parse_certs("tls.crt", &self.cert_pem)?;
        let (leaf, intermediates) =
            chain
                .split_first()
                .ok_or_else(|| CertError::NoCertificate {
                    what: "tls.crt".into(),
                })?;
        let since_epoch = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        for name in names {
            let server_name =
                ServerName::try_from(name.clone()).map_err(|e| CertError::Invalid {
                    name: name.clone(),
                    when: when(),
                    reason: e.to_string(),
                })?;
            verifier
                .verify_server_cert(
                    leaf,
                    intermediates,
                    &server_name,
                    &[],
                    UnixTime::since_unix_epoch(since_epoch),
                )
                .map_err(|e| CertError::Invalid {
                    name: name.clone(),
                    when: when(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Whether this bundle serves `names` now and still will [`RENEW_BEFORE`] from now.
    pub fn fresh(&self, names: &[String], now: SystemTime) -> Result<(), CertError> {
        self.check(names, now)?;
        self.check(names, now + RENEW_BEFORE)
    }

    /// A new serving certificate for `names`, signed by this bundle's CA when this
    /// webhook holds its key and the CA outlives the new certificate; else by a new CA,
    /// with the old one kept second in `caBundle` so that servers still presenting the
    /// old certificate stay trusted while they change over.
    pub fn renew(&self, names: &[String], now: SystemTime) -> Result<Self, CertError> {
        let old_ca = self
            .ca_pem
            .as_deref()
            .and_then(|pem| parse_certs("ca.crt", pem).ok())
            .and_then(|certs| certs.into_iter().next());
        if let (Some(ca_pem), Some(ca_key)) = (&self.ca_pem, &self.ca_key_pem) {
            if let Ok(authority) = Authority::from_key(ca_pem, ca_key) {
                let renewed = authority.issue(names, now, None)?;
                // The CA itself must last as long as the certificate it just signed:
                // checking the chain near the end of the new certificate's life says so.
                let end_of_life = now + LEAF_VALIDITY - RENEW_BEFORE;
                if renewed.check(names, now).is_ok() && renewed.check(names, end_of_life).is_ok() {
                    return Ok(renewed);
                }
            }
        }
        Authority::generate(now)?.issue(names, now, old_ca.map(|c| pem_of(&c)))
    }
}

/// A CA that can sign: its certificate as rcgen holds it (for the issuer's name and key
/// identifier) and its key.
struct Authority {
    cert: Certificate,
    key: KeyPair,
    /// The CA certificate(s) as PEM, as they go in `caBundle`.
    pem: String,
}

impl Authority {
    fn params(now: SystemTime) -> Result<CertificateParams, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_NAME);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + CA_VALIDITY);
        params.serial_number = Some(random_serial());
        Ok(params)
    }

    fn generate(now: SystemTime) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(generate_error)?;
        let cert = Self::params(now)?
            .self_signed(&key)
            .map_err(generate_error)?;
        let pem = cert.pem();
        Ok(Self { cert, key, pem })
    }

    /// A CA this webhook made before, from the PEM it stored. The rcgen certificate is
    /// rebuilt from the key and [`CA_NAME`]: what a signature needs from the issuer is
    /// its name and key, which are the stored CA's.
    fn from_key(ca_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Pem {
            what: "ca.key".into(),
            reason: e.to_string(),
        })?;
        let cert = Self::params(SystemTime::now())?
            .self_signed(&key)
            .map_err(generate_error)?;
        Ok(Self {
            cert,
            key,
            pem: ca_pem.to_owned(),
        })
    }

    /// A serving certificate for `names`, valid from now (backdated) for
    /// [`LEAF_VALIDITY`]. `previous_ca` is kept in `caBundle` after this CA.
    fn issue(
        &self,
        names: &[String],
        now: SystemTime,
        previous_ca: Option<String>,
    ) -> Result<Bundle, CertError> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(generate_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.last().map_or("thaw-webhook", String::as_str),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + LEAF_VALIDITY);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(generate_error)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(generate_error)?;
        let mut ca_pem = self.pem.clone();
        if let Some(previous) = previous_ca {
            ca_pem.push_str(&previous);
        }
        Ok(Bundle {
            ca_pem: Some(ca_pem),
            ca_key_pem: Some(self.key.serialize_pem()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn generate_error(e: rcgen::Error) -> CertError {
    CertError::Generate(e.to_string())
}

fn random_serial() -> SerialNumber {
    // Positive (top bit clear) and 16 bytes, as RFC 5280 asks of serial numbers.
    let mut bytes: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    bytes[0] &= 0x7f;
    SerialNumber::from(bytes)
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn rfc3339(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn pem_of(cert: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A certificate's `notBefore` and `notAfter`, read from its DER (RFC 5280 §4.1:
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }`, the
/// validity being the fifth element of the TBS after an optional `[0]` version).
fn validity(der: &CertificateDer<'_>) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    use yasna::tags::TAG_GENERALIZEDTIME;
    use yasna::Tag;
    fn time(r: yasna::BERReader<'_, '_>) -> yasna::ASN1Result<OffsetDateTime> {
        if r.lookahead_tag()? == TAG_GENERALIZEDTIME {
            Ok(*r.read_generalized_time()?.datetime())
        } else {
            Ok(*r.read_utctime()?.datetime())
        }
    }
    yasna::parse_der(der.as_ref(), |r| {
        r.read_sequence(|cert| {
            let validity = cert.next().read_sequence(|tbs| {
                tbs.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                for _ in 0..3 {
                    // serialNumber, signature, issuer
                    tbs.next().read_der()?;
                }
                let validity = tbs.next().read_sequence(|v| {
                    let not_before = time(v.next())?;
                    let not_after = time(v.next())?;
                    Ok((not_before, not_after))
                })?;
                while tbs.read_optional(|r| r.read_der())?.is_some() {}
                Ok(validity)
            })?;
            cert.next().read_der()?;
            cert.next().read_der()?;
            Ok(validity)
        })
    })
    .map_err(|e| format!("not an X.509 certificate: {e}"))
}

fn parse_certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what: what.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

fn parse_key(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    rustls_pemfile::private_key(&mut BufReader::new(pem.as_bytes()))
        .map_err(|e| CertError::Pem {
            what: what.into(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| CertError::NoPrivateKey { what: what.into() })
}

/// What is being served right now.
struct Current {
    bundle: Bundle,
    config: Arc<ServerConfig>,
}

/// The certificate being served, swapped whole when it is renewed or reloaded. Each
/// connection takes the configuration current when it arrives; established connections
/// keep theirs. Those who write `caBundle` [`subscribe`](Self::subscribe) to changes.
#[derive(Clone)]
pub struct Served {
    current: Arc<watch::Sender<Arc<Current>>>,
}

impl Served {
    pub fn new(bundle: Bundle) -> Result<Self, CertError> {
        let config = Arc::new(bundle.server_config()?);
        Ok(Self {
            current: Arc::new(watch::Sender::new(Arc::new(Current { bundle, config }))),
        })
    }

    /// The acceptor for the next connection; it owns its configuration, so no lock is
    /// held during the handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.borrow().config))
    }

    pub fn bundle(&self) -> Bundle {
        self.current.borrow().bundle.clone()
    }

    /// Serves `bundle` from the next connection on. Returns whether it differs from what
    /// was served; a bundle that cannot serve is refused and the old one kept.
    pub fn replace(&self, bundle: Bundle) -> Result<bool, CertError> {
        if self.current.borrow().bundle == bundle {
            return Ok(false);
        }
        let config = Arc::new(bundle.server_config()?);
        self.current
            .send_replace(Arc::new(Current { bundle, config }));
        Ok(true)
    }

    /// The CA to publish, now and whenever it changes.
    pub fn subscribe(&self) -> CaWatch {
        CaWatch {
            rx: self.current.subscribe(),
        }
    }
}

/// Follows the CA of what is served.
pub struct CaWatch {
    rx: watch::Receiver<Arc<Current>>,
}

impl CaWatch {
    /// The CA (PEM) served now, if it is known.
    pub fn ca(&mut self) -> Option<String> {
        self.rx.borrow_and_update().bundle.ca_pem.clone()
    }

    /// Waits for the served bundle to change; `false` once nothing can change it again.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn names() -> Vec<String> {
        dns_names("thaw-webhook", "thaw-system")
    }

    #[test]
    fn names_cover_every_way_the_service_is_dialled() {
        assert_eq!(
            names(),
            [
                "thaw-webhook",
                "thaw-webhook.thaw-system",
                "thaw-webhook.thaw-system.svc",
                "thaw-webhook.thaw-system.svc.cluster.local"
            ]
        );
    }

    #[test]
    fn a_generated_bundle_chains_to_its_ca_for_every_name() {
        let now = SystemTime::now();
        let b = Bundle::generate(&names(), now).unwrap();
        b.check(&names(), now).unwrap();
        b.fresh(&names(), now).unwrap();
        b.server_config().unwrap();
        // Not for another service, not after it expires, not before it was made.
        let e = b.check(&["other.thaw-system.svc".into()], now).unwrap_err();
        assert!(
            matches!(e, CertError::Invalid { ref name, .. } if name == "other.thaw-system.svc"),
            "{e}"
        );
        assert!(b.check(&names(), now + LEAF_VALIDITY + DAY).is_err());
        assert!(b.check(&names(), now - 2 * BACKDATE).is_err());
        // Another CA does not vouch for it.
        let other = Bundle::generate(&names(), now).unwrap();
        let mixed = Bundle {
            ca_pem: other.ca_pem.clone(),
            ..b.clone()
        };
        assert!(mixed.check(&names(), now).is_err());
    }

    #[test]
    fn fresh_means_still_valid_a_renewal_period_ahead() {
        let made = SystemTime::now();
        let b = Bundle::generate(&names(), made).unwrap();
        let late = made + LEAF_VALIDITY - RENEW_BEFORE + DAY;
        b.check(&names(), late).unwrap();
        assert!(b.fresh(&names(), late).is_err());
    }

    #[test]
    fn renewal_keeps_the_ca_while_it_lasts() {
        let made = SystemTime::now();
        let b = Bundle::generate(&names(), made).unwrap();
        let later = made + LEAF_VALIDITY - RENEW_BEFORE + DAY;
        let r = b.renew(&names(), later).unwrap();
        assert_eq!(r.ca_pem, b.ca_pem, "same CA, so caBundle need not change");
        assert_ne!(r.cert_pem, b.cert_pem);
        r.fresh(&names(), later).unwrap();
        // The renewed certificate is signed by the stored CA: it chains to the CA
        // certificate as stored, not only to the rebuilt one.
        r.check(&names(), later).unwrap();
    }

    #[test]
    fn a_ca_near_its_end_is_replaced_and_the_old_one_kept_second() {
        let made = SystemTime::now();
        let b = Bundle::generate(&names(), made).unwrap();
        let near_end = made + CA_VALIDITY - 100 * DAY;
        let r = b.renew(&names(), near_end).unwrap();
        let ca = r.ca_pem.clone().unwrap();
        let old = b.ca_pem.clone().unwrap();
        assert!(!ca.starts_with(&old), "a new CA comes first");
        assert_eq!(parse_certs("ca", &ca).unwrap().len(), 2);
        assert_eq!(
            parse_certs("ca", &ca).unwrap()[1],
            parse_certs("ca", &old).unwrap()[0]
        );
        r.fresh(&names(), near_end).unwrap();
        // A server still on the old certificate is trusted by the new bundle.
        let old_leaf = Bundle {
            ca_pem: Some(ca),
            ..b.clone()
        };
        old_leaf.check(&names(), made + DAY).unwrap();
    }

    #[test]
    fn a_bundle_without_its_ca_cannot_be_renewed_in_place() {
        let now = SystemTime::now();
        let b = Bundle::generate(&names(), now).unwrap();
        let foreign = Bundle {
            ca_key_pem: None,
            ..b.clone()
        };
        let r = foreign.renew(&names(), now).unwrap();
        assert_ne!(r.ca_pem, b.ca_pem);
    }

    #[test]
    fn bad_pem_is_an_error_naming_the_part() {
        let now = SystemTime::now();
        let b = Bundle::generate(&names(), now).unwrap();
        let no_cert = Bundle {
            cert_pem: "hello".into(),
            ..b.clone()
        };
        assert_eq!(
            no_cert.server_config().unwrap_err(),
            CertError::NoCertificate {
                what: "tls.crt".into()
            }
        );
        let no_key = Bundle {
            key_pem: b.cert_pem.clone(),
            ..b.clone()
        };
        assert_eq!(
            no_key.server_config().unwrap_err(),
            CertError::NoPrivateKey {
                what: "tls.key".into()
            }
        );
        // A key that is not the certificate's.
        let other = Bundle::generate(&names(), now).unwrap();
        let mismatched = Bundle {
            key_pem: other.key_pem,
            ..b
        };
        assert!(matches!(
            mismatched.server_config().unwrap_err(),
            CertError::Config(_)
        ));
    }

    #[test]
    fn validity_is_read_from_the_certificate() {
        let now = SystemTime::now();
        let b = Bundle::generate(&names(), now).unwrap();
        let ca = &parse_certs("ca", b.ca_pem.as_deref().unwrap()).unwrap()[0];
        let (from, to) = validity(ca).unwrap();
        let secs = |t: OffsetDateTime| t.unix_timestamp();
        let now_s = OffsetDateTime::from(now).unix_timestamp();
        assert_eq!(secs(from), now_s - BACKDATE.as_secs() as i64);
        assert_eq!(secs(to), now_s + CA_VALIDITY.as_secs() as i64);
        let leaf = &parse_certs("tls", &b.cert_pem).unwrap()[0];
        assert_eq!(
            secs(validity(leaf).unwrap().1),
            now_s + LEAF_VALIDITY.as_secs() as i64
        );
        assert!(validity(&CertificateDer::from(vec![0x30, 0x00])).is_err());
    }

    #[test]
    fn an_expired_ca_vouches_for_nothing() {
        let made = SystemTime::now();
        let b = Bundle::generate(&names(), made).unwrap();
        let e = b.check(&names(), made + CA_VALIDITY + DAY).unwrap_err();
        assert!(e.to_string().contains("no CA in it is valid then"), "{e}");
    }

    #[test]
    fn pem_round_trips() {
        let b = Bundle::generate(&names(), SystemTime::now()).unwrap();
        let ca = parse_certs("ca", b.ca_pem.as_deref().unwrap()).unwrap();
        assert_eq!(parse_certs("ca", &pem_of(&ca[0])).unwrap(), ca);
    }

    #[tokio::test]
    async fn served_swaps_and_tells_subscribers() {
        let now = SystemTime::now();
        let a = Bundle::generate(&names(), now).unwrap();
        let served = Served::new(a.clone()).unwrap();
        let mut ca = served.subscribe();
        assert_eq!(ca.ca(), a.ca_pem);
        assert!(
            !served.replace(a.clone()).unwrap(),
            "same bundle: no change"
        );
        let broken = Bundle {
            key_pem: "x".into(),
            ..a.clone()
        };
        assert!(served.replace(broken).is_err());
        assert_eq!(served.bundle(), a);
        let b = Bundle::generate(&names(), now).unwrap();
        assert!(served.replace(b.clone()).unwrap());
        assert!(ca.changed().await);
        assert_eq!(ca.ca(), b.ca_pem);
    }
}
