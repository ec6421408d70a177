//! An OCI distribution-API client (the calls `push`, `pull` and lazy runs need), over
//! `ureq`: a timeout on every request, retries with backoff on 5xx, 429 and transport
//! failures (resets, refused connections), and registry authentication: anonymous,
//! basic, and bearer tokens from the registry's token endpoint (the `WWW-Authenticate`
//! challenge flow).

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use ureq::http::Response;
use ureq::tls::Certificate;
use ureq::Body;

use super::reference::Reference;
use crate::store::StoreError;

/// Every request: connect, and each read or write, bounded by this by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of a request that fails with a 5xx, a 429 or a transport error.
const ATTEMPTS: u32 = 4;
/// First backoff; doubled after each failed attempt.
const BACKOFF: Duration = Duration::from_millis(100);
/// Largest manifest or token answer read.
const MAX_SMALL: u64 = 16 << 20;
/// Bytes read from a connection at once.
const INPUT_BUFFER: usize = 256 << 10;

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Plain HTTP (allowed only for a loopback registry).
    pub insecure: bool,
    /// A PEM file of CA certificates trusted besides the system's.
    pub ca_cert: Option<std::path::PathBuf>,
    /// `user:password` given explicitly; else `~/.docker/config.json` is looked up.
    pub credentials: Option<(String, String)>,
    /// Per-request timeout ([`DEFAULT_TIMEOUT`] when zero).
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
enum Auth {
    None,
    Basic(String),
    Bearer(String),
}

/// A client for one repository of one registry.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    /// `host[:port]/repo` for messages.
    what: String,
    repo: String,
    registry: String,
    push: bool,
    credentials: Option<(String, String)>,
    auth: Mutex<Auth>,
    abandoned: AtomicBool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registry::Client({})", self.what)
    }
}

/// Whether `host` (without port) is a loopback address or `localhost`.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    format!("sha256:{:x}", h.finalize())
}

/// The registry's credentials in docker's `config.json` (`auths.REGISTRY.auth`, base64
/// `user:password`), if any.
pub fn docker_credentials(registry: &str) -> Result<Option<(String, String)>, StoreError> {
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    let bad = |reason: String| StoreError::Registry {
        what: registry.to_owned(),
        reason: format!(
            "{} cannot be used: {reason}; fix it or log in again (`warmstart login`)",
            path.display()
        ),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("it is not JSON: {e}")))?;
    let auths = v.get("auths").and_then(|a| a.as_object());
    let Some(entry) = auths.and_then(|a| {
        a.get(registry)
            .or_else(|| a.get(&format!("https://{registry}")))
            .or_else(|| a.get(&format!("http://{registry}")))
    }) else {
        return Ok(None);
    };
    let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) else {
        return Ok(None);
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| bad(format!("the auth of {registry} is not base64: {e}")))?;
    let s =
        String::from_utf8(raw).map_err(|_| bad(format!("the auth of {registry} is not UTF-8")))?;
    let Some((u, p)) = s.split_once(':') else {
        return Err(bad(format!("the auth of {registry} is not user:password")));
    };
    Ok(Some((u.to_owned(), p.to_owned())))
}

/// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub fn docker_config_path() -> Option<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(std::path::PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".docker/config.json"))
}

/// Records `user:password` for `registry` in docker's `config.json` (kept 0600, written
/// atomically; other entries kept).
pub fn save_docker_credentials(
    registry: &str,
    user: &str,
    password: &str,
) -> Result<std::path::PathBuf, StoreError> {
    let path = docker_config_path().ok_or_else(|| StoreError::Registry {
        what: registry.to_owned(),
        reason: "neither HOME nor DOCKER_CONFIG is set: nowhere to keep the credentials".into(),
    })?;
    let mut v: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| StoreError::Registry {
            what: registry.to_owned(),
            reason: format!("{} is not JSON ({e}): fix or remove it", path.display()),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    if !v.is_object() {
        v = serde_json::json!({});
    }
    let obj = v.as_object_mut().expect("an object");
    let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
    if !auths.is_object() {
        *auths = serde_json::json!({});
    }
    auths
        .as_object_mut()
        .expect("an object")
        .insert(registry.to_owned(), serde_json::json!({ "auth": auth }));
    let dir = path.parent().expect("config.json has a parent");
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create", dir.to_owned(), e))?;
    let tmp = dir.join(format!(".config.json.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&v)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        StoreError::io("write", path.clone(), e)
    })?;
    Ok(path)
}

/// TLS with the system's root certificates, and those of `ca_cert` if given.
fn tls_config(ca_cert: Option<&Path>, what: &str) -> Result<ureq::tls::TlsConfig, StoreError> {
    let mut roots = Vec::new();
    if let Ok(native) = rustls_native_certs::load_native_certs() {
        roots.extend(native.iter().map(|c| Certificate::from_der(c).to_owned()));
    }
    if let Some(ca) = ca_cert {
        add_pem_roots(&mut roots, ca, what)?;
    }
    // The one crypto provider built in (ring).
    Ok(ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::from(roots))
        .build())
}

/// Adds the PEM certificates of file `ca_cert` (at least one) to `roots`.
fn add_pem_roots(
    roots: &mut Vec<Certificate<'static>>,
    ca_cert: &Path,
    what: &str,
) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::Registry {
        what: what.to_owned(),
        reason: format!("--ca-cert {}: {reason}", ca_cert.display()),
    };
    let pem = std::fs::read(ca_cert).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let mut n = 0;
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        let c = c.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        rustls::RootCertStore::empty()
            .add(c.clone())
            .map_err(|e| bad(format!("a certificate cannot be used: {e}")))?;
        roots.push(Certificate::from_der(&c).to_owned());
        n += 1;
    }
    if n == 0 {
        return Err(bad("it holds no PEM certificate".into()));
    }
    Ok(())
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

pub(crate) fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = std::collections::HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, v) = s.split_once('=')?;
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, after) = if let Some(q) = v.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_owned(), &q[end + 1..])
        } else {
            let end = v.find(',').unwrap_or(v.len());
            (v[..end].trim().to_owned(), &v[end..])
        };
        params.insert(k, val);
        s = after.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// Header `name` of `r`, if it is there and text.
fn header<'a>(r: &'a Response<Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// What one request failed of.
enum Failure {
    Status(u16, String),
    Transport(String),
}

impl Client {
    /// A client for `r`'s repository; `push`: it will upload (token scope `pull,push`).
    pub fn new(r: &Reference, opts: &Options, push: bool) -> Result<Client, StoreError> {
        let what = format!("{}/{}", r.registry, r.repository);
        if opts.insecure && !is_loopback(r.host()) {
            return Err(StoreError::Registry {
                what,
                reason: "--insecure (plain HTTP) is allowed only for a loopback registry \
                         (localhost, 127.0.0.1, ::1): use TLS (with --ca-cert for a private CA)"
                    .into(),
            });
        }
        let timeout = if opts.timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            opts.timeout
        };
        let mut b = ureq::Agent::config_builder()
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .timeout_per_read(Some(timeout))
            .timeout_per_write(Some(timeout))
            .max_redirects(5)
            // Statuses are answered here (401 challenges, 404s, retries on 5xx).
            .http_status_as_error(false)
            // As before: no proxy from the environment for a registry named explicitly.
            .proxy(None)
            // Reads of a socket in large pieces: a pull reads gigabytes, and 8 KiB reads
            // (ureq 2's fixed buffer) cost a third of its system time in `recvfrom`.
            .input_buffer_size(INPUT_BUFFER)
            // Pulls fetch on several connections at once: keep them all for the next
            // blob rather than connecting again.
            .max_idle_connections_per_host(32)
            .user_agent(concat!("warmstart/", env!("CARGO_PKG_VERSION")));
        // The system's roots are read only for TLS (reading and parsing them took a
        // plain-HTTP lazy run's start-up ~10 ms when ureq did it for every agent).
        if !opts.insecure {
            b = b.tls_config(tls_config(opts.ca_cert.as_deref(), &what)?);
        }
        let credentials = match &opts.credentials {
            Some(c) => Some(c.clone()),
            None => docker_credentials(&r.registry)?,
        };
        let scheme = if opts.insecure { "http" } else { "https" };
        Ok(Client {
            agent: b.build().into(),
            base: format!("{scheme}://{}/v2/{}", r.registry, r.repository),
            what,
            repo: r.repository.clone(),
            registry: r.registry.clone(),
            push,
            credentials,
            auth: Mutex::new(Auth::None),
            abandoned: AtomicBool::new(false),
        })
    }

    /// `host[:port]/repo`.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Makes every request waiting or to come fail at once (the instance they were for
    /// is over).
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    fn err(&self, reason: String) -> StoreError {
        StoreError::Registry {
            what: self.what.clone(),
            reason,
        }
    }

    fn auth_header(&self) -> Option<String> {
        match &*self.auth.lock().unwrap() {
            Auth::None => None,
            Auth::Basic(b) => Some(format!("Basic {b}")),
            Auth::Bearer(t) => Some(format!("Bearer {t}")),
        }
    }

    fn basic(&self) -> Option<String> {
        self.credentials
            .as_ref()
            .map(|(u, p)| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
    }

    /// Answers a 401's challenge: sets the auth for the next attempt.
    fn authenticate(&self, challenge: Option<&str>) -> Result<(), StoreError> {
        let no_creds = || {
            self.err(format!(
                "the registry requires authentication and no credentials are known for {}: \
                 `warmstart login {}` (or docker login) first",
                self.registry, self.registry
            ))
        };
        match challenge.and_then(parse_challenge) {
            Some(Challenge::Basic) | None => {
                let b = self.basic().ok_or_else(no_creds)?;
                *self.auth.lock().unwrap() = Auth::Basic(b);
                Ok(())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let actions = if self.push { "pull,push" } else { "pull" };
                let scope = scope.unwrap_or_else(|| format!("repository:{}:{actions}", self.repo));
                let mut req = self.agent.get(&realm).query("scope", &scope);
                if let Some(s) = &service {
                    req = req.query("service", s);
                }
                if let Some(b) = self.basic() {
                    req = req.header("Authorization", &format!("Basic {b}"));
                }
                let resp = req
                    .call()
                    .map_err(|e| self.err(format!("cannot get a token from {realm}: {e}")))?;
                match resp.status().as_u16() {
                    200..=299 => {}
                    401 | 403 => {
                        return Err(self.err(format!(
                            "the token endpoint {realm} refused the credentials{}: check the \
                             user and password (`warmstart login {}`)",
                            if self.credentials.is_some() {
                                ""
                            } else {
                                " (none given)"
                            },
                            self.registry
                        )))
                    }
                    code => {
                        return Err(
                            self.err(format!("cannot get a token from {realm}: HTTP {code}"))
                        )
                    }
                }
                let mut body = String::new();
                resp.into_body()
                    .into_reader()
                    .take(MAX_SMALL)
                    .read_to_string(&mut body)
                    .map_err(|e| self.err(format!("reading the token from {realm}: {e}")))?;
                let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
                    self.err(format!("the token endpoint {realm} answered no JSON: {e}"))
                })?;
                let token = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| {
                        self.err(format!("the token endpoint {realm} answered no token"))
                    })?;
                *self.auth.lock().unwrap() = Auth::Bearer(token.to_owned());
                Ok(())
            }
        }
    }

    /// One request with retries and authentication; `ok` lists the expected statuses.
    /// `Ok(None)` for a 404 when `missing_ok`.
    fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        missing_ok: bool,
    ) -> Result<Option<Response<Body>>, StoreError> {
        let mut backoff = BACKOFF;
        let mut authed = false;
        let mut last = String::new();
        let mut attempt = 0;
        while attempt < ATTEMPTS {
            if self.is_abandoned() {
                return Err(StoreError::PageReadsAbandoned {
                    addr: self.what.clone(),
                });
            }
            let mut req = ureq::http::Request::builder().method(method).uri(url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(a) = self.auth_header() {
                req = req.header("Authorization", a);
            }
            let not_request = |e: ureq::http::Error| self.err(format!("{method} {url}: {e}"));
            let res = match body {
                Some(b) => self.agent.run(req.body(b).map_err(not_request)?),
                None => self.agent.run(req.body(()).map_err(not_request)?),
            };
            let failure = match res {
                Ok(r) if r.status().is_success() => return Ok(Some(r)),
                Ok(r) if r.status() == 401 && !authed => {
                    authed = true;
                    let ch = (r.headers().get("www-authenticate"))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    self.authenticate(ch.as_deref())?;
                    continue;
                }
                Ok(r) if r.status() == 401 || r.status() == 403 => {
                    return Err(self.err(format!(
                        "{method} {url}: the registry refused the credentials{}: check the \
                         user and password (`warmstart login {}`)",
                        if self.credentials.is_some() {
                            ""
                        } else {
                            " (none given)"
                        },
                        self.registry
                    )))
                }
                Ok(r) if r.status() == 404 && missing_ok => return Ok(None),
                Ok(r) => {
                    let code = r.status().as_u16();
                    let mut text = String::new();
                    let _ = (r.into_body().into_reader().take(4096)).read_to_string(&mut text);
                    Failure::Status(code, text)
                }
                Err(e) => Failure::Transport(e.to_string()),
            };
            match failure {
                Failure::Status(code, text) if code >= 500 || code == 429 => {
                    last = format!("HTTP {code}: {}", text.trim());
                }
                Failure::Status(code, text) => {
                    return Err(self.err(format!("{method} {url}: HTTP {code}: {}", text.trim())))
                }
                Failure::Transport(t) => last = t,
            }
            attempt += 1;
            if attempt < ATTEMPTS {
                std::thread::sleep(backoff);
                backoff *= 2;
            }
        }
        Err(self.err(format!(
            "{method} {url} failed {ATTEMPTS} times, last: {last} (is the registry up and \
             reachable?)"
        )))
    }

    /// Whether the repository has blob `digest` (a `HEAD`).
    pub fn has_blob(&self, digest: &str) -> Result<bool, StoreError> {
        let url = format!("{}/blobs/{digest}", self.base);
        Ok(self.request("HEAD", &url, &[], None, true)?.is_some())
    }

    /// Uploads `bytes` as blob `digest` (monolithic: POST then PUT).
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let url = format!("{}/blobs/uploads/", self.base);
        let r = self
            .request("POST", &url, &[], Some(&[]), false)?
            .expect("not missing_ok");
        let loc = header(&r, "location")
            .ok_or_else(|| self.err("the upload answer has no Location".into()))?
            .to_owned();
        let loc = if loc.starts_with("http://") || loc.starts_with("https://") {
            loc
        } else {
            let origin = self.base.split("/v2/").next().unwrap_or_default();
            format!("{origin}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        self.request(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream")],
            Some(bytes),
            false,
        )?;
        Ok(())
    }

    /// The body's length as `r` announces it (`Content-Length`), refused beyond `max`.
    fn announced(
        &self,
        r: &Response<Body>,
        what: &str,
        max: u64,
    ) -> Result<Option<usize>, StoreError> {
        let n = header(r, "content-length").and_then(|l| l.parse::<u64>().ok());
        match n {
            Some(n) if n > max => {
                Err(self.err(format!("{what} is {n} bytes, more than {max} expected")))
            }
            n => Ok(n.map(|n| n as usize)),
        }
    }

    fn read_body(&self, r: Response<Body>, what: &str, max: u64) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        if let Some(n) = self.announced(&r, what, max)? {
            crate::buffers::reserve(&mut out, n);
        }
        (r.into_body().into_reader())
            .take(max + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.err(format!("reading {what}: {e}")))?;
        if out.len() as u64 > max {
            return Err(self.err(format!("{what} is more than the {max} bytes expected")));
        }
        Ok(out)
    }

    /// [`Self::read_body`] into `out` (its memory reused), hashing (sha256) each piece
    /// as it comes and giving `seen` the body so far after each.
    fn read_body_hashed(
        &self,
        r: Response<Body>,
        what: &str,
        max: u64,
        mut out: Vec<u8>,
        seen: &mut dyn FnMut(&[u8]),
    ) -> Result<(Vec<u8>, String), StoreError> {
        const PIECE: usize = 256 << 10;
        seen(&[]);
        // `out`'s bytes up to its length are initialized already (a buffer used before):
        // read into as they are; only room it lacks for the announced length is added
        // (zeroed once).
        if let Some(n) = self.announced(&r, what, max)? {
            let lacking = n.saturating_sub(out.len());
            crate::buffers::reserve(&mut out, lacking);
            if out.len() < n {
                out.resize(n, 0);
            }
        }
        let mut body = r.into_body().into_reader().take(max + 1);
        let mut h = Sha256::new();
        let mut probe = [0u8; 4096];
        let mut filled = 0;
        loop {
            // Past the room for the announced length (where the body should end, or with
            // no length announced) through a small buffer.
            let got = if filled < out.len() {
                let end = (filled + PIECE).min(out.len());
                body.read(&mut out[filled..end])
            } else {
                let got = body.read(&mut probe);
                if let Ok(k) = got {
                    out.extend_from_slice(&probe[..k]);
                }
                got
            };
            let k = match got {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(format!("reading {what}: {e}"))),
            };
            h.update(&out[filled..filled + k]);
            filled += k;
            if filled as u64 > max {
                return Err(self.err(format!("{what} is more than the {max} bytes expected")));
            }
            seen(&out[..filled]);
        }
        out.truncate(filled);
        Ok((out, format!("sha256:{:x}", h.finalize())))
    }

    /// Blob `digest` of `size` bytes, checked against its digest.
    pub fn get_blob(&self, digest: &str, size: u64) -> Result<Vec<u8>, StoreError> {
        self.get_blob_into(digest, size, Vec::new())
    }

    /// [`Self::get_blob`] into `buf` (its memory reused: a pull fetches gigabytes, and
    /// fresh memory costs a page fault per 4 KiB, on a VM a host fault too).
    pub fn get_blob_into(
        &self,
        digest: &str,
        size: u64,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        self.get_blob_seen(digest, size, buf, &mut |_| {})
    }

    /// [`Self::get_blob_into`], giving `seen` the bytes that came so far after each read
    /// (not checked yet: the digest is checked at the end; a prefix shorter than the one
    /// before means the transfer started over, a retry), so that the caller can work on
    /// them while the rest comes. Each piece is hashed as it comes, while in the cache.
    pub fn get_blob_seen(
        &self,
        digest: &str,
        size: u64,
        mut buf: Vec<u8>,
        seen: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<u8>, StoreError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let mut tries = 0;
        loop {
            let r = self
                .request("GET", &url, &[], None, false)?
                .expect("present");
            // A body cut short is retried like a reset.
            let what = format!("blob {digest}");
            match self.read_body_hashed(r, &what, size, std::mem::take(&mut buf), seen) {
                Ok((b, got)) => {
                    if got != digest {
                        return Err(self.err(format!(
                            "blob {digest} as served hashes to {got}: it is damaged or \
                             tampered with in the registry; refusing it (push the snapshot again)"
                        )));
                    }
                    return Ok(b);
                }
                Err(e) if tries + 1 < ATTEMPTS && !self.is_abandoned() => {
                    tries += 1;
                    tracing::debug!("retrying blob {digest}: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Bytes `start..start+len` of blob `digest` (a range request). Not verified here:
    /// the caller checks each page against its hash.
    pub fn get_range(&self, digest: &str, start: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let range = format!("bytes={}-{}", start, start + len - 1);
        let mut tries = 0;
        loop {
            let r = self
                .request("GET", &url, &[("Range", &range)], None, false)?
                .expect("present");
            let status = r.status();
            let res = if status == 206 {
                self.read_body(r, &format!("blob {digest} range {range}"), len)
            } else {
                // A registry ignoring Range sends it all: take the part asked for.
                self.read_body(r, &format!("blob {digest}"), u64::MAX >> 1)
                    .map(|b| {
                        b.get(start as usize..(start + len) as usize)
                            .map(<[u8]>::to_vec)
                            .unwrap_or_default()
                    })
            };
            match res {
                Ok(b) if b.len() as u64 == len => return Ok(b),
                Ok(b) => {
                    return Err(self.err(format!(
                        "blob {digest}: range {range} came back with {} bytes",
                        b.len()
                    )))
                }
                Err(e) if tries + 1 < ATTEMPTS && !self.is_abandoned() => {
                    tries += 1;
                    tracing::debug!("retrying a range of blob {digest}: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The manifest `reference` (a tag or digest) as bytes, checked against its digest
    /// (the one asked for, or the one the registry states).
    pub fn get_manifest(&self, reference: &str, accept: &str) -> Result<Vec<u8>, StoreError> {
        self.get_manifest_if_any(reference, accept)?.ok_or_else(|| {
            self.err(format!(
                "it has no manifest {reference}: check the reference (push it first)"
            ))
        })
    }

    /// [`Self::get_manifest`], `None` if the registry has no such manifest.
    pub fn get_manifest_if_any(
        &self,
        reference: &str,
        accept: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let Some(r) = self.request("GET", &url, &[("Accept", accept)], None, true)? else {
            return Ok(None);
        };
        let stated = header(&r, "docker-content-digest").map(str::to_owned);
        let body = self.read_body(r, &format!("manifest {reference}"), MAX_SMALL)?;
        let got = sha256_digest(&body);
        let want = if reference.starts_with("sha256:") {
            Some(reference.to_owned())
        } else {
            stated.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(want) = want {
            if want != got {
                return Err(self.err(format!(
                    "manifest {reference} hashes to {got}, not {want}: damaged or tampered \
                     with; refusing it"
                )));
            }
        }
        Ok(Some(body))
    }

    /// Stores manifest `bytes` (of `media_type`) under `tag`.
    pub fn put_manifest(
        &self,
        tag: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let url = format!("{}/manifests/{tag}", self.base);
        self.request(
            "PUT",
            &url,
            &[("Content-Type", media_type)],
            Some(bytes),
            false,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(parse_challenge("Basic realm=\"r\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.example/token\",service=\"reg\",scope=\"repository:a/b:pull\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
    }

    #[test]
    fn loopback() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]"));
        assert!(!is_loopback("10.0.0.1"));
        assert!(!is_loopback("registry.example"));
    }

    /// The bearer flow against a tiny in-test HTTP server: 401 with a challenge, the
    /// token endpoint checked for the basic credentials, then the token accepted.
    #[test]
    fn bearer_flow() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let (s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut auth = String::new();
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("authorization: ") {
                        auth = v.trim().to_owned();
                    }
                }
                let path = line.split(' ').nth(1).unwrap().to_owned();
                seen.push((path.clone(), auth.clone()));
                let mut s = s;
                let (status, extra, body) = if path.starts_with("/token") {
                    // "u:p" in base64 is dTpw.
                    if auth == "basic dtpw" {
                        ("200 OK", String::new(), "{\"token\":\"T0K\"}".to_owned())
                    } else {
                        ("401 Unauthorized", String::new(), String::new())
                    }
                } else if auth == "bearer t0k" {
                    ("200 OK", String::new(), "{}".to_owned())
                } else {
                    (
                        "401 Unauthorized",
                        format!(
                            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"t\"\r\n"
                        ),
                        String::new(),
                    )
                };
                write!(
                    s,
                    "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        let r = Reference::parse(&format!("127.0.0.1:{port}/a/b:t")).unwrap();
        let opts = Options {
            insecure: true,
            credentials: Some(("u".into(), "p".into())),
            ..Default::default()
        };
        let c = Client::new(&r, &opts, false).unwrap();
        let m = c.get_manifest("t", "application/json").unwrap();
        assert_eq!(m, b"{}");
        let seen = server.join().unwrap();
        assert_eq!(seen[0].0, "/v2/a/b/manifests/t");
        assert!(seen[1].0.starts_with("/token?"), "{seen:?}");
        assert!(
            seen[1].0.contains("scope=repository%3Aa%2Fb%3Apull"),
            "{seen:?}"
        );
        assert_eq!(seen[2].1, "bearer t0k");
    }
}
