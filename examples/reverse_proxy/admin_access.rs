//! Who the admin server answers: requests for one of its own names (the
//! `Host` rule, against DNS rebinding), and, for the writes (`PUT /config`,
//! `DELETE /keys/*`; every read too with `--admin-token-reads`), only a
//! client with the admin token. Every answer carries `nosniff` and
//! `no-store`.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, Response, StatusCode};
use axum::middleware::Next;
use sha2::{Digest, Sha256};

use crate::cli::UsageError;
use crate::problem::problem;

/// The environment variable that may hold the admin token.
pub(crate) const TOKEN_ENV: &str = "IDEMPOTENCY_ADMIN_TOKEN";

/// The admin token, kept as its SHA-256 digest: comparing two digests in
/// constant time tells nothing of the token's length either.
#[derive(Clone)]
pub(crate) struct Token([u8; 32]);

impl Token {
    fn new(text: &str) -> Self {
        Self(Sha256::digest(text.as_bytes()).into())
    }

    /// Whether `presented` is the token, in time that depends on neither.
    fn admits(&self, presented: &str) -> bool {
        let presented = Sha256::digest(presented.as_bytes());
        let differ = self
            .0
            .iter()
            .zip(presented.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        differ == 0
    }
}

/// The admin server's access rules, from the flags.
#[derive(Clone)]
pub(crate) struct Access {
    token: Option<Token>,
    reads_need_token: bool,
    /// Names given with `--admin-host`, lowercase.
    hosts: Arc<[String]>,
}

impl Access {
    /// The rules from `--admin-token-file` (or the environment's
    /// [`TOKEN_ENV`]), `--admin-token-reads` and `--admin-host`.
    pub(crate) fn from_flags(
        token_file: Option<&Path>,
        env_token: Option<String>,
        reads_need_token: bool,
        hosts: &[String],
    ) -> Result<Self, UsageError> {
        let token = match (token_file, env_token) {
            (Some(path), _) => Some(read_token_file(path)?),
            (None, Some(text)) => Some(non_empty(text.trim(), TOKEN_ENV)?),
            (None, None) => None,
        };
        if reads_need_token && token.is_none() {
            return Err(UsageError::new(format!(
                "--admin-token-reads needs a token: --admin-token-file PATH or {TOKEN_ENV}"
            )));
        }
        Ok(Self {
            token: token.map(|text| Token::new(&text)),
            reads_need_token,
            hosts: hosts.iter().map(|host| host.to_ascii_lowercase()).collect(),
        })
    }

    /// Whether a request for `host` (the `Host` header or the URI's
    /// authority, port included) is for one of this server's names.
    fn answers_host(&self, host: &str) -> bool {
        let name = strip_port(host);
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let bare = match name.strip_prefix('[') {
            Some(rest) => match rest.strip_suffix(']') {
                Some(ip) => ip,
                None => return false,
            },
            None => &name,
        };
        bare.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.hosts.contains(&name)
    }
}

fn non_empty(text: &str, from: &str) -> Result<String, UsageError> {
    if text.is_empty() {
        return Err(UsageError::new(format!("{from}: the admin token is empty")));
    }
    Ok(text.to_owned())
}

/// The token in `path`, refused when others than its owner may read it.
fn read_token_file(path: &Path) -> Result<String, UsageError> {
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .map_err(|e| UsageError::new(format!("--admin-token-file {shown}: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(UsageError::new(format!(
                "--admin-token-file {shown}: the file may be read by others than its owner \
                 (mode {:o}); make it private with `chmod 600 {shown}`",
                mode & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = metadata;
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError::new(format!("--admin-token-file {shown}: {e}")))?;
    non_empty(text.trim(), &format!("--admin-token-file {shown}"))
}

/// `host` without its port (`[::1]:3002` → `[::1]`, `a:3002` → `a`).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((name, _)) if !name.contains(':') => name,
        _ => host,
    }
}

/// Applies the rules to each admin request; stamps every answer.
pub(crate) async fn guard(
    State(access): State<Access>,
    request: Request,
    next: Next,
) -> Response<Body> {
    let mut response = match refusal(&access, &request) {
        Some(refused) => refused,
        None => next.run(request).await,
    };
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Why `request` is not answered, if it is not.
fn refusal(access: &Access, request: &Request) -> Option<Response<Body>> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if !host.is_some_and(|host| access.answers_host(host)) {
        return Some(problem(
            StatusCode::MISDIRECTED_REQUEST,
            "Not this server's name",
            "The admin server answers requests for an IP address, localhost, or a name \
             given with --admin-host.",
        ));
    }
    let writes = !matches!(*request.method(), Method::GET | Method::HEAD);
    // The page holds no data: it loads without the token and asks for it.
    let page = request.uri().path() == "/";
    if !writes && (!access.reads_need_token || page) {
        return None;
    }
    let Some(token) = &access.token else {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "Admin writes are disabled",
            &format!(
                "No admin token is configured, so the admin server is read-only. Start the \
                 proxy with --admin-token-file PATH (a file only its owner can read) or \
                 {TOKEN_ENV} set, and send Authorization: Bearer <token>."
            ),
        ));
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    if presented.is_some_and(|presented| token.admits(presented)) {
        return None;
    }
    let mut refused = problem(
        StatusCode::UNAUTHORIZED,
        "Admin token required",
        "Send Authorization: Bearer <token>, the token the proxy was started with.",
    );
    refused
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(hosts: &[&str]) -> Access {
        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        Access::from_flags(None, None, false, &hosts).unwrap()
    }

    #[test]
    fn ip_literals_loopback_names_and_listed_names_are_answered() {
        let access = access(&["Admin.Internal"]);
        for host in [
            "127.0.0.1:3002",
            "10.1.2.3",
            "[::1]:3002",
            "[::1]",
            "::1",
            "localhost:3002",
            "LOCALHOST.",
            "admin.internal:3002",
        ] {
            assert!(access.answers_host(host), "{host}");
        }
        for host in ["evil.example:3002", "127.0.0.1.nip.io", "", "[::1"] {
            assert!(!access.answers_host(host), "{host}");
        }
    }

    #[test]
    fn tokens_compare_by_digest() {
        let token = Token::new("s3cret");
        assert!(token.admits("s3cret"));
        assert!(!token.admits("s3cret "));
        assert!(!token.admits(""));
    }
}
