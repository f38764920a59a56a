//! TLS for the coordinator's TCP listener and the workers that dial it,
//! from the `[tls]` section's PEM files (rustls, through tonic).
//!
//! Without TLS the token, member ids and gradients cross the network in
//! clear; with it, a worker verifies the coordinator's certificate against
//! `tls.ca`, and with `tls.client_ca` the coordinator accepts only workers
//! whose certificate chains to it (mutual TLS).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A configured file cannot be read.
    #[error("tls.{key} = {path}: {source}")]
    Read {
        /// The configuration key.
        key: &'static str,
        /// The path it holds.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An `https://` address without a CA to verify the coordinator by.
    #[error(
        "the coordinator address {address} is https:// but tls.ca is not set: give the worker \
         the CA that signed the coordinator's certificate (or use http:// if it does not serve TLS)"
    )]
    NoCa {
        /// The address.
        address: String,
    },
}

/// Makes aws-lc-rs the process's TLS crypto provider. Two providers are
/// compiled in (the S3 client's and tonic's dependencies), and rustls
/// refuses to guess between them. Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The coordinator's TLS settings, when `tls.server_cert` is set.
pub fn server(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&tls.server_cert, &tls.server_key) else {
        return Ok(None);
    };
    install_crypto();
    let identity = Identity::from_pem(read("server_cert", cert)?, read("server_key", key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("client_ca", ca)?));
    }
    Ok(Some(config))
}

/// A worker's TLS settings for dialling `address`: `None` for `http://`.
pub fn client(tls: &TlsConfig, address: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
    if !address.starts_with("https://") {
        return Ok(None);
    }
    let ca = tls.ca.as_ref().ok_or_else(|| TlsError::NoCa {
        address: address.to_string(),
    })?;
    install_crypto();
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca", ca)?));
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        config = config.identity(Identity::from_pem(
            read("client_cert", cert)?,
            read("client_key", key)?,
        ));
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(Some(config))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_needs_nothing_and_https_needs_a_ca() {
        let none = TlsConfig::default();
        assert!(client(&none, "http://10.0.0.5:50051").unwrap().is_none());
        let err = client(&none, "https://coordinator:50051").unwrap_err();
        assert!(err.to_string().contains("tls.ca is not set"), "{err}");
        assert!(server(&none).unwrap().is_none());
    }

    #[test]
    fn a_missing_file_names_its_key() {
        let tls = TlsConfig {
            server_cert: Some("/nonexistent/cert.pem".into()),
            server_key: Some("/nonexistent/key.pem".into()),
            ..Default::default()
        };
        let err = server(&tls).unwrap_err().to_string();
        assert!(
            err.starts_with("tls.server_cert = /nonexistent/cert.pem"),
            "{err}"
        );
    }
}
