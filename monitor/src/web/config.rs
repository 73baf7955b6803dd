//! The web configuration file (`--web-config`), in the exporter-toolkit format that
//! node_exporter and Prometheus read (`--web.config.file`), so an operator's file works
//! unchanged: `tls_server_config`, `basic_auth_users`, `http_server_config.headers` and
//! `rate_limit`. Unknown keys are errors, as in the toolkit's strict YAML reading.
//!
//! Reading is split from building: [`Sources`] holds the bytes of the file and of every file
//! it names, so the watcher can tell whether anything changed, and [`build`] is pure, so unit
//! tests reach every rule without files.
//!
//! What rustls cannot do is refused with a message rather than quietly weakened:
//! `RequestClientCert` / `RequireAnyClientCert` (a client certificate taken unverified),
//! `client_allowed_sans`, TLS below 1.2 as the highest version, and cipher suites or curves
//! outside rustls's set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// The largest file read: web configs, certificates and keys are a few KiB.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The headers the toolkit lets an operator set, with the values it accepts (`None`: any).
const ALLOWED_HEADERS: [(&str, Option<&[&str]>); 5] = [
    ("Strict-Transport-Security", None),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-XSS-Protection", None),
    ("Content-Security-Policy", None),
];

/// A web configuration that cannot be used, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("web config {}: {}{message}", path.display(), key.as_deref().map(|k| format!("`{k}`: ")).unwrap_or_default())]
pub struct WebConfigError {
    /// The file.
    pub path: PathBuf,
    /// The key at fault, dotted (`tls_server_config.cert_file`), when one is.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// How the metrics endpoint protects itself, built from a web configuration file.
#[derive(Clone, Default)]
pub struct WebConfig {
    /// TLS, when the file configures it.
    pub tls: Option<Arc<ServerConfig>>,
    /// Basic-auth users and their bcrypt hashes; empty: no authentication.
    pub users: BTreeMap<String, String>,
    /// Headers added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// At most `burst` requests, refilled one per `interval` (429 beyond).
    pub rate_limit: Option<RateLimit>,
}

/// The toolkit's `rate_limit`: a token bucket over all requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed at once.
    pub burst: u32,
    /// One more request allowed per interval.
    pub interval: Duration,
}

/// The bytes a web configuration is built from: the file and every file it names (or why
/// one could not be read). Equal sources build the same configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The configuration file.
    pub path: PathBuf,
    /// Its bytes.
    pub config: Vec<u8>,
    /// Each named file, by the key that names it: its path and bytes, or the read error.
    pub named: BTreeMap<&'static str, (PathBuf, Result<Vec<u8>, String>)>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    tls_server_config: TlsFile,
    #[serde(default)]
    http_server_config: HttpFile,
    rate_limit: Option<RateLimitFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    #[serde(default)]
    cipher_suites: Vec<String>,
    #[serde(default)]
    curve_preferences: Vec<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    prefer_server_cipher_suites: Option<bool>,
    client_allowed_sans: Option<Vec<String>>,
}

impl TlsFile {
    /// Whether TLS is configured at all (the toolkit's rule: any certificate, key or client
    /// setting turns it on).
    fn enabled(&self) -> bool {
        self.cert.is_some()
            || self.key.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.client_ca.is_some()
            || self.client_ca_file.is_some()
            || self.client_auth_type.is_some()
    }

    /// The files it names, by key, relative ones taken from the configuration's directory.
    fn files(&self, dir: &Path) -> BTreeMap<&'static str, PathBuf> {
        [
            ("tls_server_config.cert_file", &self.cert_file),
            ("tls_server_config.key_file", &self.key_file),
            ("tls_server_config.client_ca_file", &self.client_ca_file),
        ]
        .into_iter()
        .filter_map(|(key, path)| Some((key, dir.join(path.as_ref()?))))
        .collect()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    /// Accepted for compatibility: tcpmon serves HTTP/1.1 only (ALPN says so).
    #[allow(dead_code)]
    http2: Option<bool>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    burst: u32,
    interval: String,
}

/// Reads a file of at most [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(bytes)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<FileConfig, WebConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| WebConfigError {
        path: path.to_owned(),
        key: None,
        message: format!("not UTF-8: {e}"),
    })?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_saphyr::from_str(text).map_err(|e| {
        // The parser's message is followed by a snippet of the file: one line for the log.
        let message = e.to_string();
        let first = message.lines().next().unwrap_or_default();
        WebConfigError {
            path: path.to_owned(),
            key: None,
            message: first.trim_start_matches("error: ").to_owned(),
        }
    })
}

impl Sources {
    /// Reads the configuration file and every file it names. Only the configuration file
    /// itself must be readable here; a named file's error is reported by [`build`].
    pub fn read(path: &Path) -> Result<Sources, WebConfigError> {
        let config = read_bounded(path).map_err(|message| WebConfigError {
            path: path.to_owned(),
            key: None,
            message: format!("cannot read it: {message}"),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let named = match parse(path, &config) {
            Ok(file) => file
                .tls_server_config
                .files(dir)
                .into_iter()
                .map(|(key, file)| {
                    let bytes = read_bounded(&file);
                    (key, (file, bytes))
                })
                .collect(),
            Err(_) => BTreeMap::new(), // `build` reports the syntax error
        };
        Ok(Sources { path: path.to_owned(), config, named })
    }
}

/// Builds the configuration the sources describe, or says which key is wrong.
pub fn build(sources: &Sources) -> Result<WebConfig, WebConfigError> {
    let path = &sources.path;
    let error = |key: &str, message: String| WebConfigError {
        path: path.clone(),
        key: Some(key.to_owned()),
        message,
    };
    let file = parse(path, &sources.config)?;
    let mut users = BTreeMap::new();
    for (user, hash) in file.basic_auth_users {
        if let Err(e) = hash.parse::<bcrypt::HashParts>() {
            return Err(error(
                &format!("basic_auth_users.{user}"),
                format!("not a bcrypt hash: {e}"),
            ));
        }
        users.insert(user, hash);
    }
    let mut headers = Vec::new();
    for (name, value) in file.http_server_config.headers {
        let key = format!("http_server_config.headers.{name}");
        let Some((_, allowed)) =
            ALLOWED_HEADERS.iter().find(|(known, _)| known.eq_ignore_ascii_case(&name))
        else {
            let known: Vec<_> = ALLOWED_HEADERS.iter().map(|(name, _)| *name).collect();
            return Err(error(
                &key,
                format!("not a header that may be set (may: {})", known.join(", ")),
            ));
        };
        if let Some(allowed) = allowed {
            if !allowed.iter().any(|a| a.eq_ignore_ascii_case(&value)) {
                return Err(error(&key, format!("`{value}` is not one of {}", allowed.join(", "))));
            }
        }
        let header_name = HeaderName::from_bytes(name.as_bytes());
        let header_value = HeaderValue::from_str(&value);
        match (header_name, header_value) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => return Err(error(&key, "not a valid header".to_owned())),
        }
    }
    let rate_limit = match file.rate_limit {
        None => None,
        Some(limit) => {
            let interval = humantime::parse_duration(&limit.interval)
                .map_err(|e| error("rate_limit.interval", format!("`{}`: {e}", limit.interval)))?;
            if limit.burst == 0 || interval.is_zero() {
                None // the toolkit's "interval 0: no limit"
            } else {
                Some(RateLimit { burst: limit.burst, interval })
            }
        }
    };
    let tls = if file.tls_server_config.enabled() {
        Some(Arc::new(tls(&file.tls_server_config, sources, &error)?))
    } else {
        None
    };
    Ok(WebConfig { tls, users, headers, rate_limit })
}

/// The bytes of an inline value or a named file.
fn material<'a>(
    inline: &'a Option<String>,
    file_key: &'static str,
    sources: &'a Sources,
) -> Option<Result<&'a [u8], String>> {
    if let Some((path, bytes)) = sources.named.get(file_key) {
        return Some(bytes.as_deref().map_err(|e| format!("cannot read {}: {e}", path.display())));
    }
    inline.as_deref().map(|text| Ok(text.as_bytes()))
}

fn tls(
    file: &TlsFile,
    sources: &Sources,
    error: &dyn Fn(&str, String) -> WebConfigError,
) -> Result<ServerConfig, WebConfigError> {
    const CERT: &str = "tls_server_config.cert_file";
    const KEY: &str = "tls_server_config.key_file";
    const CA: &str = "tls_server_config.client_ca_file";
    let cert_bytes = material(&file.cert, CERT, sources)
        .ok_or_else(|| error("tls_server_config", "missing one of cert or cert_file".into()))?
        .map_err(|e| error(CERT, e))?;
    let key_bytes = material(&file.key, KEY, sources)
        .ok_or_else(|| error("tls_server_config", "missing one of key or key_file".into()))?
        .map_err(|e| error(KEY, e))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| error(CERT, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(error(CERT, "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_bytes)
        .map_err(|e| error(KEY, format!("no PEM private key: {e}")))?;

    // ring, not aws-lc-rs: no cmake/C build of aws-lc on every machine. rustls 0.23.48
    // deprecates it for lacking post-quantum key exchange (X25519MLKEM768), which the
    // scrapers of today (Prometheus's Go TLS) do not offer a metrics endpoint anyway.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    if !file.cipher_suites.is_empty() {
        provider.cipher_suites = cipher_suites(&provider, &file.cipher_suites)
            .map_err(|e| error("tls_server_config.cipher_suites", e))?;
    }
    if !file.curve_preferences.is_empty() {
        provider.kx_groups = curves(&provider, &file.curve_preferences)
            .map_err(|e| error("tls_server_config.curve_preferences", e))?;
    }
    let provider = Arc::new(provider);
    let versions = versions(file.min_version.as_deref(), file.max_version.as_deref())
        .map_err(|(key, e)| error(key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| error("tls_server_config.cipher_suites", e.to_string()))?;

    let client_auth = file.client_auth_type.as_deref().unwrap_or("NoClientCert");
    const AUTH: &str = "tls_server_config.client_auth_type";
    let ca = material(&file.client_ca, CA, sources);
    if file.client_allowed_sans.is_some() {
        return Err(error(
            "tls_server_config.client_allowed_sans",
            "not supported by tcpmon; verify clients with client_ca_file instead".into(),
        ));
    }
    let builder = match client_auth {
        "" | "NoClientCert" => {
            if ca.is_some() {
                return Err(error(CA, "a client CA needs a client_auth_type".into()));
            }
            builder.with_no_client_auth()
        }
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let ca = ca
                .ok_or_else(|| error(CA, format!("{client_auth} needs client_ca_file")))?
                .map_err(|e| error(CA, e))?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| error(CA, format!("not PEM certificates: {e}")))?;
                roots.add(cert).map_err(|e| error(CA, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(error(CA, "no certificate in it".into()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if client_auth == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder
                .with_client_cert_verifier(verifier.build().map_err(|e| error(CA, e.to_string()))?)
        }
        "RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert" => {
            return Err(error(
                AUTH,
                format!(
                    "{client_auth} takes client certificates without verifying them, which \
                     tcpmon does not do; use RequireAndVerifyClientCert with client_ca_file"
                ),
            ))
        }
        other => {
            return Err(error(
                AUTH,
                format!(
                    "`{other}` is not one of NoClientCert, VerifyClientCertIfGiven, \
                     RequireAndVerifyClientCert"
                ),
            ))
        }
    };
    let mut config =
        builder.with_single_cert(certs, key).map_err(|e| error(KEY, format!("{e}")))?;
    config.ignore_client_order = file.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The TLS 1.2 suites named (Go's names are the IANA ones rustls uses); TLS 1.3's are all
/// kept, as Go does (its `cipher_suites` applies to TLS 1.2 only).
fn cipher_suites(
    provider: &CryptoProvider,
    names: &[String],
) -> Result<Vec<rustls::SupportedCipherSuite>, String> {
    let tls12 = |s: &rustls::SupportedCipherSuite| s.version() == &rustls::version::TLS12;
    let mut chosen: Vec<_> = Vec::new();
    for name in names {
        let found = provider
            .cipher_suites
            .iter()
            .find(|s| tls12(s) && format!("{:?}", s.suite()) == *name)
            .ok_or_else(|| {
                let known: Vec<_> = provider
                    .cipher_suites
                    .iter()
                    .filter(|s| tls12(s))
                    .map(|s| format!("{:?}", s.suite()))
                    .collect();
                format!("`{name}` is not a TLS 1.2 suite rustls offers ({})", known.join(", "))
            })?;
        chosen.push(*found);
    }
    chosen.extend(provider.cipher_suites.iter().filter(|s| !tls12(s)).copied());
    Ok(chosen)
}

/// The key-exchange groups named, in the order given (Go's curve names).
fn curves(
    provider: &CryptoProvider,
    names: &[String],
) -> Result<Vec<&'static dyn rustls::crypto::SupportedKxGroup>, String> {
    names
        .iter()
        .map(|name| {
            let group = match name.as_str() {
                "X25519" => rustls::NamedGroup::X25519,
                "CurveP256" => rustls::NamedGroup::secp256r1,
                "CurveP384" => rustls::NamedGroup::secp384r1,
                other => {
                    return Err(format!("`{other}` is not one of X25519, CurveP256, CurveP384"))
                }
            };
            provider
                .kx_groups
                .iter()
                .find(|g| g.name() == group)
                .copied()
                .ok_or_else(|| format!("`{name}` is not available"))
        })
        .collect()
}

/// The protocol versions from `min_version` to `max_version` (TLS12 to TLS13 by default).
/// rustls has no TLS 1.0 or 1.1: a lower minimum means 1.2.
fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, (&'static str, String)> {
    let rank = |key: &'static str, text: &str| match text {
        "TLS10" => Ok(10),
        "TLS11" => Ok(11),
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        other => Err((key, format!("`{other}` is not one of TLS10, TLS11, TLS12, TLS13"))),
    };
    let min = min.map(|m| rank("tls_server_config.min_version", m)).transpose()?.unwrap_or(12);
    let max = max.map(|m| rank("tls_server_config.max_version", m)).transpose()?.unwrap_or(13);
    let versions: Vec<_> = [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(rank, _)| (min..=max).contains(rank))
        .map(|(_, version)| version)
        .collect();
    if versions.is_empty() {
        return Err((
            "tls_server_config.max_version",
            "no TLS version left between min_version and max_version (tcpmon speaks TLS 1.2 \
             and 1.3)"
                .to_owned(),
        ));
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sources for `text`, with a server certificate and key at `cert_file`/`key_file` paths.
    fn sources(text: &str) -> Sources {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let path = PathBuf::from("/etc/tcpmon/web.yml");
        let parsed = parse(&path, text.as_bytes()).unwrap_or_default();
        let named = parsed
            .tls_server_config
            .files(Path::new("/etc/tcpmon"))
            .into_iter()
            .map(|(key_name, file)| {
                let bytes = match key_name {
                    "tls_server_config.cert_file" => cert.pem().into_bytes(),
                    "tls_server_config.key_file" => key.serialize_pem().into_bytes(),
                    _ => cert.pem().into_bytes(), // a CA: the self-signed one
                };
                (key_name, (file, Ok(bytes)))
            })
            .collect();
        Sources { path, config: text.as_bytes().to_vec(), named }
    }

    fn key_of(text: &str) -> Option<String> {
        build(&sources(text)).err().and_then(|e| e.key)
    }

    const TLS: &str = "tls_server_config:\n  cert_file: server.pem\n  key_file: /abs/server.key\n";

    #[test]
    fn an_empty_file_is_plain_http_and_relative_paths_are_from_its_directory() {
        let plain = build(&sources("")).unwrap();
        assert!(plain.tls.is_none() && plain.users.is_empty() && plain.rate_limit.is_none());
        let parsed = parse(Path::new("/x"), TLS.as_bytes()).unwrap();
        let files = parsed.tls_server_config.files(Path::new("/etc/tcpmon"));
        assert_eq!(files["tls_server_config.cert_file"], PathBuf::from("/etc/tcpmon/server.pem"));
        assert_eq!(files["tls_server_config.key_file"], PathBuf::from("/abs/server.key"));
    }

    #[test]
    fn tls_versions_suites_and_curves_follow_the_file() {
        let config = build(&sources(&format!(
            "{TLS}  min_version: TLS13\n  curve_preferences: [X25519]\n  prefer_server_cipher_suites: false\n"
        )))
        .unwrap();
        let tls = config.tls.unwrap();
        assert!(!tls.ignore_client_order);
        assert_eq!(tls.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let suites = cipher_suites(
            #[allow(deprecated)]
            &rustls::crypto::ring::default_provider(),
            &["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384".to_owned()],
        )
        .unwrap();
        let tls12: Vec<_> = suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(tls12, ["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"]);
        assert_eq!(suites.len(), 4, "the three TLS 1.3 suites stay");
        assert_eq!(versions(Some("TLS10"), None).unwrap().len(), 2, "TLS10 means 1.2 here");
        assert_eq!(versions(Some("TLS13"), None).unwrap().len(), 1);
        assert!(versions(None, Some("TLS11")).is_err());
    }

    #[test]
    fn every_unusable_setting_is_an_error_naming_its_key() {
        let cases = [
            (format!("{TLS}  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n"), "tls_server_config.cipher_suites"),
            (format!("{TLS}  curve_preferences: [CurveP521]\n"), "tls_server_config.curve_preferences"),
            (format!("{TLS}  max_version: TLS11\n"), "tls_server_config.max_version"),
            (format!("{TLS}  client_auth_type: Sometimes\n"), "tls_server_config.client_auth_type"),
            (format!("{TLS}  client_auth_type: RequireAndVerifyClientCert\n"), "tls_server_config.client_ca_file"),
            (format!("{TLS}  client_ca_file: ca.pem\n"), "tls_server_config.client_ca_file"),
            (format!("{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n  client_allowed_sans: [a]\n"), "tls_server_config.client_allowed_sans"),
            ("tls_server_config:\n  key_file: k\n".to_owned(), "tls_server_config"),
            ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n".to_owned(), "http_server_config.headers.X-Frame-Options"),
            ("rate_limit:\n  burst: 1\n  interval: soon\n".to_owned(), "rate_limit.interval"),
            ("basic_auth_users:\n  alice: x\n".to_owned(), "basic_auth_users.alice"),
        ];
        for (text, key) in cases {
            assert_eq!(key_of(&text).as_deref(), Some(key), "{text}");
        }
        let unknown = build(&sources("tls_server_config:\n  cert_fle: x\n")).err().unwrap();
        assert!(unknown.to_string().contains("cert_fle"), "{unknown}");
        assert!(!unknown.to_string().contains('\n'), "one line for the log: {unknown}");
    }

    #[test]
    fn client_certificates_headers_users_and_rate_limit_are_taken() {
        let text = format!(
            "{TLS}  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.pem\n\
             http_server_config:\n  http2: true\n  headers:\n    Strict-Transport-Security: max-age=31536000\n\
             rate_limit:\n  burst: 10\n  interval: 1s\n\
             basic_auth_users:\n  alice: $2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG\n"
        );
        let config = build(&sources(&text)).unwrap();
        assert!(config.tls.is_some());
        assert_eq!(config.users.len(), 1);
        assert_eq!(config.headers[0].0.as_str(), "strict-transport-security");
        assert_eq!(
            config.rate_limit,
            Some(RateLimit { burst: 10, interval: Duration::from_secs(1) })
        );
        let unreadable = Sources {
            named: [(
                "tls_server_config.cert_file",
                (PathBuf::from("/nowhere.pem"), Err("No such file".to_owned())),
            )]
            .into(),
            ..sources(TLS)
        };
        let e = build(&unreadable).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("tls_server_config.cert_file"));
        assert!(e.message.contains("/nowhere.pem"), "{e}");
    }
}
