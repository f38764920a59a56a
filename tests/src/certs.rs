//! Certificates for TLS tests, generated in the test (rcgen): a CA, a
//! server certificate for 127.0.0.1 and a client certificate, as PEM files
//! in a temporary folder.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// PEM files of one test PKI.
pub struct Pki {
    /// The CA certificate (trusted by both sides).
    pub ca: PathBuf,
    /// The coordinator's certificate, for 127.0.0.1 and localhost.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A worker's client certificate, signed by the same CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA nobody trusts, to show verification is real.
    pub other_ca: PathBuf,
}

/// Writes a fresh PKI into `dir`.
pub fn generate(dir: &Path) -> Pki {
    let (ca_pem, issuer) = authority("gancluster test CA");
    let (other_ca, _) = authority("someone else's CA");
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("names");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).expect("signing");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) =
        leaf(vec!["127.0.0.1".into(), "localhost".into()], "coordinator");
    let (client_cert, client_key) = leaf(vec!["worker".into()], "worker");
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("writing a PEM file");
        path
    };
    Pki {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
        other_ca: write("other-ca.pem", &other_ca),
    }
}

fn authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signing the CA");
    (cert.pem(), Issuer::new(params, key))
}
