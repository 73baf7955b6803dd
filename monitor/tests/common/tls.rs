//! TLS for the tests: a throw-away CA with server and client certificates (rcgen), a web
//! configuration file that uses them, and a blocking HTTPS client (rustls).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The basic-auth user of [`Pki::web_config`] and its password.
pub const USER: &str = "prometheus";
pub const PASSWORD: &str = "correct horse";

/// A CA and the files signed by it, in `dir`: `ca.pem`, `server.pem`/`server.key` (for
/// 127.0.0.1 and localhost), `client.pem`/`client.key`.
pub struct Pki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "tcpmon test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let pki = Pki { dir: dir.to_owned(), ca };
        pki.issue("server", &["127.0.0.1", "localhost"]);
        pki.issue("client", &["scraper.test"]);
        pki
    }

    /// Issues `{name}.pem` and `{name}.key` anew (written elsewhere, then renamed over the
    /// old ones, as a certificate manager does); returns the certificate's DER.
    pub fn issue(&self, name: &str, names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &self.ca).unwrap();
        for (ext, text) in [("pem", cert.pem()), ("key", key.serialize_pem())] {
            let staged = self.dir.join(format!(".{name}.{ext}.new"));
            std::fs::write(&staged, text).unwrap();
            std::fs::rename(&staged, self.dir.join(format!("{name}.{ext}"))).unwrap();
        }
        cert.der().to_vec()
    }

    /// Writes `web.yml`: TLS with the server certificate (relative paths, as operators
    /// write them), basic auth for [`USER`], `extra` appended. Returns its path.
    pub fn web_config(&self, extra: &str) -> PathBuf {
        let path = self.dir.join("web.yml");
        std::fs::write(&path, web_config_text("server.pem", "server.key", extra)).unwrap();
        path
    }

    /// A client that trusts the CA, presenting the client certificate if `identify`.
    pub fn client(&self, identify: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.dir.join("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(if identify {
            let certs = CertificateDer::pem_file_iter(self.dir.join("client.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(self.dir.join("client.key")).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        } else {
            builder.with_no_client_auth()
        })
    }
}

/// A web config with TLS from `cert_file` and `key_file`, basic auth for [`USER`], and
/// `extra` (more `tls_server_config` keys, or other sections).
pub fn web_config_text(cert_file: &str, key_file: &str, extra: &str) -> String {
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    format!(
        "tls_server_config:\n  cert_file: {cert_file}\n  key_file: {key_file}\n{extra}\
         basic_auth_users:\n  {USER}: {hash}\n"
    )
}

/// What an HTTPS request got: the status, the lower-cased head, the body, and the
/// certificate the server presented.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
    pub certificate: Vec<u8>,
}

/// `GET path` over TLS on a new connection, with basic auth if `credentials`.
pub fn https_get(
    address: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    path: &str,
    credentials: Option<(&str, &str)>,
) -> std::io::Result<Answer> {
    use base64::Engine as _;
    let name = ServerName::IpAddress(address.ip().into());
    let connection = rustls::ClientConnection::new(client, name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(address)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let auth = credentials
        .map(|(user, password)| {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Authorization: Basic {encoded}\r\n")
        })
        .unwrap_or_default();
    write!(tls, "GET {path} HTTP/1.1\r\nHost: tcpmon\r\nConnection: close\r\n{auth}\r\n")?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A peer that closes without close_notify after a complete answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e),
    }
    let certificate = tls
        .conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(Answer { status, head: head.to_lowercase(), body: body.to_owned(), certificate })
}

/// The first certificate of a PEM file, DER.
pub fn pem_certificate(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path).unwrap().next().unwrap().unwrap().to_vec()
}
