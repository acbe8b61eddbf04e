//! Connecting to NATS: URL, the usual authentication, TLS.

use std::path::PathBuf;
use std::time::Duration;

/// How to reach NATS. Shared by workers, the coordinator and clients.
///
/// ```
/// use orchestrix_worker::NatsOptions;
/// let opts = NatsOptions::new("nats://127.0.0.1:4222").user_password("svc", "secret");
/// # let _ = opts;
/// ```
#[derive(Clone)]
#[non_exhaustive]
#[must_use]
pub struct NatsOptions {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// User and password.
    pub user_password: Option<(String, String)>,
    /// Token.
    pub token: Option<String>,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// Extra root certificate(s) to trust, PEM.
    pub tls_root_certificate: Option<PathBuf>,
    /// Client certificate and key, PEM, for mutual TLS.
    pub tls_client_certificate: Option<(PathBuf, PathBuf)>,
    /// Refuse to connect without TLS.
    pub require_tls: bool,
    /// Connection name shown by the server.
    pub name: Option<String>,
    /// How long the first connection may take before giving up.
    pub connect_timeout: Duration,
    /// Prefix of this connection's reply subjects (default `_INBOX`): with
    /// per-user permissions, each user gets its own (`_INBOX_alice`), so
    /// nobody can read another's replies. `NATS_INBOX_PREFIX` sets it too.
    pub inbox_prefix: Option<String>,
}

impl std::fmt::Debug for NatsOptions {
    /// Secrets (passwords, tokens, and credentials in the URL) are not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: bool| if set { "<redacted>" } else { "none" };
        let url = self.display_url();
        f.debug_struct("NatsOptions")
            .field("url", &url)
            .field("user", &self.user_password.as_ref().map(|(u, _)| u))
            .field("password", &hidden(self.user_password.is_some()))
            .field("token", &hidden(self.token.is_some()))
            .field("credentials_file", &self.credentials_file)
            .field("tls_root_certificate", &self.tls_root_certificate)
            .field("tls_client_certificate", &self.tls_client_certificate)
            .field("require_tls", &self.require_tls)
            .field("name", &self.name)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish_non_exhaustive()
    }
}

/// The NATS URL used when none is given: `NATS_URL`, else the local default.
pub fn default_nats_url() -> String {
    std::env::var("NATS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into())
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions::new(default_nats_url())
    }
}

/// NATS could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The credentials file could not be read.
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The URL is not a NATS URL.
    #[error("bad NATS URL `{url}`: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The reply-subject prefix is not a valid subject prefix.
    #[error(
        "bad inbox prefix `{prefix}`: subject tokens separated by `.`, no wildcards, spaces or empty tokens (e.g. `_INBOX_shop`)"
    )]
    BadInboxPrefix {
        /// The prefix given.
        prefix: String,
    },
    /// A TLS file (CA, client certificate or key) cannot be read.
    #[error("cannot read the TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server did not accept the connection.
    #[error("cannot connect to NATS at {url}: {reason}{hint}")]
    Connect {
        /// Where (with any secret in the URL hidden).
        url: String,
        /// Why, in words (the source's text, each cause said once).
        reason: String,
        /// Why.
        #[source]
        source: async_nats::ConnectError,
        /// What to try, when the cause is a common one (`; …`, or empty).
        hint: String,
    },
}

/// The first value of a message's header `name` (exact case), found by
/// walking its few headers: `HeaderMap::get` validates the name and
/// allocates one for every lookup, which showed in the per-command profile.
pub(crate) fn header<'a>(
    headers: Option<&'a async_nats::HeaderMap>,
    name: &str,
) -> Option<&'a str> {
    headers?
        .iter()
        .find(|(k, _)| AsRef::<str>::as_ref(*k) == name)
        .and_then(|(_, values)| values.first())
        .map(async_nats::HeaderValue::as_str)
}

/// An error's text with each cause said once: NATS errors often repeat
/// their kind in their cause (`authorization violation: nats: authorization
/// violation`, `JetStream error: jetstream error: …`).
pub fn said_once(text: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split(": ") {
        let bare = |p: &str| p.trim().trim_start_matches("nats: ").to_ascii_lowercase();
        match parts.last() {
            Some(last) if bare(last) == bare(part) || bare(part) == "nats" => {}
            _ => parts.push(part),
        }
    }
    parts.join(": ")
}

/// What to try after a failed connection, for the causes users meet first.
fn connect_hint(error: &str, ca_given: bool) -> String {
    let e = error.to_ascii_lowercase();
    if e.contains("unknownissuer") || e.contains("invalid peer certificate") {
        if ca_given {
            "; the server's certificate is not signed by the CA given (--tls-ca / NATS_CA), or does not name this host".into()
        } else {
            "; trust the CA that signed the server's certificate with NATS_CA=ca.pem (--tls-ca, NatsOptions::tls_root_certificate)".into()
        }
    } else if e.contains("authorization") || e.contains("authentication") {
        "; check the user and password (in the URL, NATS_USER/NATS_PASSWORD, or the CLI's --user/--password), the token (NATS_TOKEN) or the creds file (NATS_CREDS)".into()
    } else {
        String::new()
    }
}

/// `url` (one or several, comma-separated) with the secret of any
/// credentials in it hidden: `tls://shop:<redacted>@nats:4222`. A user name
/// stays; a token (no `:`) is hidden whole.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &u[scheme + 3..at];
                let shown = match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:<redacted>"),
                    None => "<redacted>".to_owned(),
                };
                format!("{}{shown}{}", &u[..scheme + 3], &u[at..])
            }
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl NatsOptions {
    /// The URL with any password or token in it hidden: for logs and errors.
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Options for `url`. As the NATS tools and the `orchestrix` CLI do, it
    /// reads the environment: `NATS_USER` with `NATS_PASSWORD`, `NATS_TOKEN`,
    /// `NATS_CREDS` (a `.creds` file), `NATS_CA` and `NATS_INBOX_PREFIX`, when
    /// set and not empty. The methods below override them.
    pub fn new(url: impl Into<String>) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        NatsOptions {
            url: url.into(),
            user_password: env("NATS_USER").zip(env("NATS_PASSWORD")),
            token: env("NATS_TOKEN"),
            credentials_file: env("NATS_CREDS").map(PathBuf::from),
            // As the NATS tools read it.
            tls_root_certificate: std::env::var_os("NATS_CA")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            tls_client_certificate: None,
            require_tls: false,
            name: None,
            connect_timeout: Duration::from_secs(5),
            inbox_prefix: std::env::var("NATS_INBOX_PREFIX").ok().filter(|p| !p.is_empty()),
        }
    }

    /// Authenticates with a user and password.
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user_password = Some((user.into(), password.into()));
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Authenticates with a `.creds` file.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials_file = Some(path.into());
        self
    }

    /// Trusts an extra root certificate (PEM) and requires TLS.
    pub fn tls_root_certificate(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_root_certificate = Some(path.into());
        self.require_tls = true;
        self
    }

    /// Presents a client certificate (mutual TLS) and requires TLS.
    pub fn tls_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client_certificate = Some((cert.into(), key.into()));
        self.require_tls = true;
        self
    }

    /// Requires TLS.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.require_tls = required;
        self
    }

    /// Names the connection.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Bounds the time to the first connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the prefix of this connection's reply subjects (see
    /// [`NatsOptions::inbox_prefix`]).
    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.inbox_prefix = Some(prefix.into());
        self
    }

    /// Connects. Fails fast (within the connect timeout) when the server is
    /// down; once connected, the client reconnects by itself after a drop.
    /// Permission violations the server reports on this connection are kept
    /// for [`permission_violations`].
    pub async fn connect(&self) -> Result<async_nats::Client, ConnectError> {
        let refused: Violations = Default::default();
        let log = refused.clone();
        let mut opts = async_nats::ConnectOptions::new()
            .connection_timeout(self.connect_timeout)
            .max_reconnects(None)
            .request_timeout(Some(Duration::from_secs(10)))
            .event_callback(move |event| {
                let log = log.clone();
                async move {
                    if let async_nats::Event::ServerError(async_nats::ServerError::Other(e)) = &event
                        && e.to_ascii_lowercase().contains("permissions violation")
                    {
                        tracing::error!(error = %e, "NATS refused an operation: this connection lacks a permission");
                        let mut v = log.lock().unwrap_or_else(|p| p.into_inner());
                        if v.len() < 64 {
                            v.push(e.clone());
                        }
                    }
                }
            });
        if let Some(prefix) = &self.inbox_prefix {
            let bad = |t: &str| {
                t.is_empty() || t.contains(['*', '>']) || t.chars().any(char::is_whitespace)
            };
            if prefix.split('.').any(bad) {
                return Err(ConnectError::BadInboxPrefix { prefix: prefix.clone() });
            }
            opts = opts.custom_inbox_prefix(prefix);
        }
        if let Some(path) = &self.credentials_file {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials { path: path.clone(), source })?;
        }
        if let Some((user, password)) = &self.user_password {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        // Checked here: the TLS layer's own error would not name the file.
        let files = self
            .tls_root_certificate
            .iter()
            .chain(self.tls_client_certificate.iter().flat_map(|(c, k)| [c, k]));
        for path in files {
            std::fs::metadata(path)
                .map_err(|source| ConnectError::TlsFile { path: path.clone(), source })?;
        }
        if let Some(ca) = &self.tls_root_certificate {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls_client_certificate {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if self.require_tls {
            opts = opts.require_tls(true);
        }
        if let Some(name) = &self.name {
            opts = opts.name(name);
        }
        let urls: Vec<&str> =
            self.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let addrs = urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConnectError::BadUrl { url: self.display_url(), reason: e.to_string() })?;
        if addrs.is_empty() {
            return Err(ConnectError::BadUrl {
                url: self.display_url(),
                reason: "no server URL given".into(),
            });
        }
        // `nats://user:password@host`: credentials in the URL, as the NATS tools take them.
        if self.user_password.is_none()
            && let Some(a) = addrs.iter().find(|a| a.has_user_pass())
            && let (Some(user), Some(password)) = (a.username(), a.password())
        {
            opts = opts.user_and_password(user.to_owned(), password.to_owned());
        }
        let client = opts.connect(addrs).await.map_err(|source| {
            let hint = connect_hint(&source.to_string(), self.tls_root_certificate.is_some());
            let reason = said_once(&source.to_string());
            ConnectError::Connect { url: self.display_url(), reason, source, hint }
        })?;
        violations_by_client().insert(client_key(&client), refused);
        Ok(client)
    }
}

type Violations = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn violations_by_client()
-> std::sync::MutexGuard<'static, std::collections::HashMap<String, Violations>> {
    static MAP: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Violations>>,
    > = std::sync::OnceLock::new();
    MAP.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

fn client_key(client: &async_nats::Client) -> String {
    let info = client.server_info();
    format!("{}/{}", info.server_id, info.client_id)
}

/// Waits for the server to have answered everything sent on `client`, then
/// returns what it refused for lack of permission (empty: nothing). For a
/// component to fail at start, naming the permission it lacks, rather than
/// time out later.
pub async fn check_permissions(client: &async_nats::Client) -> Result<(), String> {
    sync(client).await;
    // The server's -ERR came before the round trip's reply; its event is
    // handed to the callback on another task: give it a moment.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let refused = permission_violations(client);
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
    }
    Ok(())
}

/// The permission violations the server reported so far on `client` (a
/// connection made with [`NatsOptions::connect`]): what it refused, in the
/// server's words (`Permissions Violation for Subscription to "…"`). Call
/// [`sync`] first to be sure the server has answered everything sent.
pub fn permission_violations(client: &async_nats::Client) -> Vec<String> {
    violations_by_client()
        .get(&client_key(client))
        .map(|v| v.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default()
}

/// Waits until the server has processed everything this client sent so far
/// (subscriptions included): a message to a fresh inbox comes back only after
/// the server got to it. `Client::flush` only empties the client's buffer,
/// which is not enough for another connection to rely on a subscription.
/// Gives up quietly after 5 s (the connection is down; it will resubscribe).
pub async fn sync(client: &async_nats::Client) {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else { return };
    if client.publish(inbox, bytes::Bytes::new()).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_said_once() {
        assert_eq!(
            super::said_once("authorization violation: nats: authorization violation"),
            "authorization violation"
        );
        assert_eq!(
            super::said_once("JetStream error: jetstream error: maximum replicas is 5"),
            "JetStream error: maximum replicas is 5"
        );
        assert_eq!(super::said_once("cannot read: no such file"), "cannot read: no such file");
    }

    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let o = NatsOptions::new("tls://alice:s3cret@h1:4222,nats://h2:4222")
            .user_password("bob", "hunter2")
            .token("tok3n");
        let shown = format!("{o:?}");
        for secret in ["s3cret", "hunter2", "tok3n"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("tls://alice:<redacted>@h1:4222,nats://h2:4222"), "{shown}");
        assert!(shown.contains("bob"), "{shown}");
        // A token in the URL is hidden whole; a URL without credentials is kept.
        assert_eq!(redact_url("nats://t0ken@h:4222"), "nats://<redacted>@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
    }
}
