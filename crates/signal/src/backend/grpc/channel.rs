//! The HTTP/2 channel to the server, plain or TLS (rustls).

use std::{
    fmt,
    sync::{Arc, LazyLock},
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::BackendError;
use super::target::{GrpcOptions, GrpcTarget, Security};

/// A lazy gRPC channel to the server of a `grpc://` URL, secured as the
/// backend would be (TLS, `ca`, `skip_verify`, `insecure`): for the server's
/// other services, such as `RelayRegistry`.
pub fn channel_for(url: &url::Url, options: &GrpcOptions) -> Result<Channel, BackendError> {
    let target = GrpcTarget::parse(url)?;
    channel(url, &target, options)
}

pub(super) fn channel(
    url: &url::Url,
    target: &GrpcTarget,
    options: &GrpcOptions,
) -> Result<Channel, BackendError> {
    let authority = if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    // TLS is ours (the connector below), so tonic sees http; the origin keeps
    // the request's :scheme right.
    let scheme = if target.security == Security::Plaintext {
        "http"
    } else {
        "https"
    };
    let origin: Uri = format!("{scheme}://{authority}")
        .parse()
        .map_err(|e| BackendError::url(url, e))?;
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| BackendError::url(url, e))?
        .origin(origin)
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        // cunīcu's (grpc-go) server counts pings without an open stream as abuse.
        .keep_alive_while_idle(false)
        .tcp_nodelay(true);
    let tls = match &target.security {
        Security::Plaintext => return Ok(endpoint.connect_lazy()),
        Security::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A broken system certificate is skipped, as browsers do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(BackendError::url(
                    url,
                    "no system root certificates found: give ca=FILE or install them",
                ));
            }
            client_config(roots)
        }
        Security::CaFile(path) => {
            let ca_error = |e: &dyn fmt::Display| {
                BackendError::url(url, format!("ca file {}: {e}", path.display()))
            };
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_error(&e))?;
            for cert in certs {
                roots
                    .add(cert.map_err(|e| ca_error(&e))?)
                    .map_err(|e| ca_error(&e))?;
            }
            if roots.is_empty() {
                return Err(BackendError::url(
                    url,
                    format!("ca file {} holds no certificate", path.display()),
                ));
            }
            client_config(roots)
        }
        Security::SkipVerify => with_h2(
            config_builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification))
                .with_no_client_auth(),
        ),
    };
    let server_name = ServerName::try_from(target.host.clone())
        .map_err(|e| BackendError::url(url, format!("host {:?}: {e}", target.host)))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let address = authority.clone();
    let service = tower::service_fn(move |_: Uri| {
        let (connector, server_name, address) =
            (connector.clone(), server_name.clone(), address.clone());
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(service))
}

/// The ring provider, made once (it is asked on every handshake too).
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// A client configuration with our provider and the safe default versions.
pub(super) fn config_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // The ring provider supports them: never reached.
        .unwrap_or_else(|_| ClientConfig::builder())
}

/// `config` speaking HTTP/2 (ALPN `h2`), as gRPC needs.
pub(super) fn with_h2(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

pub(super) fn client_config(roots: RootCertStore) -> ClientConfig {
    with_h2(
        config_builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Accepts every certificate: `skip_verify=true`.
#[derive(Debug)]
pub(super) struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
