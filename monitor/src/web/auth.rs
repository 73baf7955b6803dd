//! Basic authentication against the web configuration's bcrypt hashes, and its rate limit.
//!
//! bcrypt is slow on purpose (cost 10 is ~70 ms), so:
//! - a password that verified is remembered per user (with the hash it matched, so a changed
//!   configuration forgets it) and compared in constant time afterwards: a scraper pays
//!   bcrypt once, not every 15 s;
//! - at most one bcrypt runs at a time, on the blocking pool: wrong passwords cost a
//!   neighbour one core at most and never delay `/healthz` or the tail;
//! - an unknown user is checked against a dummy hash, so the answer's timing does not say
//!   which users exist.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use base64::Engine as _;
use hyper::header::HeaderValue;
use subtle::ConstantTimeEq as _;

use super::config::RateLimit;

/// Passwords that verified, by user: (the hash they matched, the password).
pub struct Authenticator {
    verified: Mutex<BTreeMap<String, (String, Vec<u8>)>>,
    /// One bcrypt at a time (the permit goes with the blocking job, so a cancelled request
    /// does not let a second one start).
    bcrypt: Arc<tokio::sync::Semaphore>,
}

impl Authenticator {
    /// An authenticator that has verified nobody yet.
    pub fn new() -> Authenticator {
        Authenticator {
            verified: Mutex::default(),
            bcrypt: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Whether `authorization` (the request's header) names a user of `users` with the
    /// right password.
    pub async fn allows(
        self: &Arc<Self>,
        users: &BTreeMap<String, String>,
        authorization: Option<&HeaderValue>,
    ) -> bool {
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let hash = users.get(&user).cloned();
        if let Some(hash) = &hash {
            let verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((matched, known)) = verified.get(&user) {
                if matched == hash && bool::from(known.ct_eq(&password)) {
                    return true;
                }
            }
        }
        let Ok(one_at_a_time) = self.bcrypt.clone().acquire_owned().await else {
            return false;
        };
        // An unknown user costs what a known one does: a dummy hash at the users' cost.
        let cost =
            users.values().find_map(|h| h.parse::<bcrypt::HashParts>().ok()).map(|p| p.get_cost());
        let checked = hash.clone();
        let candidate = password.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let _held = one_at_a_time;
            let checked = checked.unwrap_or_else(|| dummy_hash(cost.unwrap_or(10)));
            bcrypt::non_truncating_verify(&candidate, &checked).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        match hash {
            Some(hash) if ok => {
                let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
                verified.insert(user, (hash, password));
                true
            }
            _ => false,
        }
    }
}

/// A hash at `cost` that no password is checked against but for unknown users (computed
/// once per cost, on the blocking pool).
fn dummy_hash(cost: u32) -> String {
    static DUMMIES: OnceLock<Mutex<BTreeMap<u32, String>>> = OnceLock::new();
    let dummies = DUMMIES.get_or_init(Mutex::default);
    let mut dummies = dummies.lock().unwrap_or_else(PoisonError::into_inner);
    dummies
        .entry(cost)
        .or_insert_with(|| bcrypt::hash("not a password of anyone", cost).unwrap_or_default())
        .clone()
}

/// The user and password of a `Basic` authorization header.
fn basic_credentials(header: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let text = header.to_str().ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

/// The web configuration's `rate_limit`: a token bucket shared by all requests.
pub struct RateLimiter {
    state: Mutex<(f64, Instant)>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter { state: Mutex::new((f64::MAX, Instant::now())) }
    }
}

impl RateLimiter {
    /// Takes a token if `limit` has one left now.
    pub fn take(&self, limit: &RateLimit) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        let refill = now.duration_since(*last).as_secs_f64() / limit.interval.as_secs_f64();
        *tokens = (*tokens + refill).min(f64::from(limit.burst));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn header(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[tokio::test]
    async fn only_a_known_user_with_the_right_password_passes_and_a_changed_hash_is_rechecked() {
        let users: BTreeMap<_, _> =
            [("prometheus".to_owned(), bcrypt::hash("s3cret", 4).unwrap())].into();
        let auth = Arc::new(Authenticator::new());
        assert!(!auth.allows(&users, None).await);
        assert!(!auth.allows(&users, Some(&header("prometheus", "wrong"))).await);
        assert!(!auth.allows(&users, Some(&header("nobody", "s3cret"))).await);
        assert!(!auth.allows(&users, Some(&HeaderValue::from_static("Bearer x"))).await);
        assert!(!auth.allows(&users, Some(&HeaderValue::from_static("Basic !!!"))).await);
        assert!(auth.allows(&users, Some(&header("prometheus", "s3cret"))).await);
        assert!(auth.allows(&users, Some(&header("prometheus", "s3cret"))).await, "remembered");
        assert!(!auth.allows(&users, Some(&header("prometheus", "s3cret2"))).await);
        // The operator changes the password: the remembered one no longer passes.
        let changed: BTreeMap<_, _> =
            [("prometheus".to_owned(), bcrypt::hash("new", 4).unwrap())].into();
        assert!(!auth.allows(&changed, Some(&header("prometheus", "s3cret"))).await);
        assert!(auth.allows(&changed, Some(&header("prometheus", "new"))).await);
        // Passwords may contain colons; only the first one splits.
        let colon: BTreeMap<_, _> = [("u".to_owned(), bcrypt::hash("a:b", 4).unwrap())].into();
        assert!(auth.allows(&colon, Some(&header("u", "a:b"))).await);
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_one_per_interval() {
        let limit = RateLimit { burst: 3, interval: Duration::from_millis(200) };
        let limiter = RateLimiter::default();
        assert_eq!((0..5).filter(|_| limiter.take(&limit)).count(), 3);
        std::thread::sleep(Duration::from_millis(250));
        assert!(limiter.take(&limit));
        assert!(!limiter.take(&limit));
    }
}
