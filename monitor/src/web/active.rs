//! The web configuration in force, re-read when its file or a file it names changes: a
//! certificate rotates without a restart, and a broken file keeps the last good
//! configuration (and says why, once per change).
//!
//! The files are polled (their bytes compared every [`POLL`]) rather than watched with
//! inotify: Kubernetes replaces a mounted Secret by swapping a symlink, which a watch on the
//! files themselves misses, and a few KiB a second cost nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use log::{info, warn};

use super::config::{build, Sources, WebConfig, WebConfigError};

/// How often the files are compared with the ones in force.
pub const POLL: Duration = Duration::from_secs(1);

/// The configuration new connections get.
pub struct ActiveConfig {
    current: RwLock<Arc<WebConfig>>,
    /// The file it comes from, if any.
    path: Option<PathBuf>,
}

impl ActiveConfig {
    /// No file: plain HTTP, no authentication.
    pub fn open() -> Arc<ActiveConfig> {
        Arc::new(ActiveConfig { current: RwLock::default(), path: None })
    }

    /// Reads and builds `path`, or says which key is wrong.
    pub fn load(path: &Path) -> Result<(Arc<ActiveConfig>, Sources), WebConfigError> {
        let sources = Sources::read(path)?;
        let config = build(&sources)?;
        let active =
            ActiveConfig { current: RwLock::new(Arc::new(config)), path: Some(path.into()) };
        Ok((Arc::new(active), sources))
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<WebConfig> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// What the start-up line says about the endpoint.
    pub fn describe(&self) -> String {
        let config = self.current();
        let mut parts = vec![if config.tls.is_some() { "TLS" } else { "plain HTTP" }.to_owned()];
        if !config.users.is_empty() {
            parts.push(format!("basic auth ({} users)", config.users.len()));
        }
        if let Some(path) = &self.path {
            parts.push(format!("from {}", path.display()));
        }
        parts.join(", ")
    }

    /// Re-reads the files every [`POLL`] and puts a changed, valid configuration in force.
    /// `last` is what the one in force was built from. Returns only if there is no file.
    pub async fn watch(self: Arc<Self>, mut last: Sources) {
        let Some(path) = self.path.clone() else { return };
        let mut unreadable: Option<WebConfigError> = None;
        loop {
            tokio::time::sleep(POLL).await;
            let reading = path.clone();
            let Ok(read) = tokio::task::spawn_blocking(move || Sources::read(&reading)).await
            else {
                continue;
            };
            let sources = match read {
                Ok(sources) if sources == last => continue,
                Ok(sources) => sources,
                Err(e) => {
                    if unreadable.as_ref() != Some(&e) {
                        warn!("{e}; keeping the last good web configuration");
                        unreadable = Some(e);
                    }
                    continue;
                }
            };
            unreadable = None;
            match build(&sources) {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                        Arc::new(config);
                    info!("web config {} changed: now {}", path.display(), self.describe());
                }
                Err(e) => warn!("{e}; keeping the last good web configuration"),
            }
            last = sources;
        }
    }
}
