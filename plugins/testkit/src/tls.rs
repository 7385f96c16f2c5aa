//! Test certificate authorities, made at test time: a CA, and server certificates it signs for
//! 127.0.0.1 and localhost, as a rustls configuration or as PEM files for a server of the test's.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority.
pub struct TestCa {
    /// Its certificate, PEM: what a client's `ca_file` holds.
    pub pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA called `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A new server certificate this CA issued for 127.0.0.1 and localhost, and its key.
    fn issue(&self) -> (rcgen::Certificate, KeyPair) {
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert, key)
    }

    /// A server certificate this CA issued for 127.0.0.1 and localhost, as PEM: the chain
    /// (server certificate, then this CA's) and the private key (PKCS#8).
    pub fn server_pem(&self) -> (String, String) {
        let (cert, key) = self.issue();
        (format!("{}{}", cert.pem(), self.pem), key.serialize_pem())
    }

    /// A rustls server configuration with a certificate this CA issued for 127.0.0.1 and
    /// localhost.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.issue();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), self.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Arc::new(config)
    }
}
