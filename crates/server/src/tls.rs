//! The server's TLS: rustls with HTTP/2 by ALPN, and a certificate and key
//! that can be read again while the server runs (SIGHUP): connections made
//! after a reload get the new pair, those open keep theirs.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::RwLock;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_rustls::TlsAcceptor;

use crate::ServerError;

/// A certificate and key read from PEM files, and read again on demand.
pub(crate) struct Reloadable {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
}

/// What new handshakes use.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

impl Reloadable {
    /// Reads the pair; fails if either file is unreadable or they do not match.
    pub(crate) fn new(cert: PathBuf, key: PathBuf) -> Result<Self, ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = read_pair(&cert, &key, &provider)?;
        Ok(Reloadable {
            cert,
            key,
            provider,
            current: Arc::new(Current(RwLock::new(Arc::new(pair)))),
        })
    }

    /// The acceptor of connections: it always uses the pair last read.
    pub(crate) fn acceptor(&self) -> Result<TlsAcceptor, ServerError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ServerError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.current.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reads the files again; on error the previous pair stays.
    pub(crate) fn reload(&self) -> Result<(), ServerError> {
        let pair = read_pair(&self.cert, &self.key, &self.provider)?;
        *self.current.0.write() = Arc::new(pair);
        Ok(())
    }
}

fn read_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ServerError> {
    let file_error = |path: &Path, e: rustls::pki_types::pem::Error| ServerError::TlsFile {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert, e))?;
    if chain.is_empty() {
        return Err(ServerError::Tls(format!(
            "{} holds no certificate",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    CertifiedKey::from_der(chain, private, provider)
        .map_err(|e| ServerError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))
}
