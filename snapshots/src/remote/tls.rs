//! TLS for the page-server protocol (`--tls-cert`, `--tls-key`, `--tls-cacert`, as CRIU
//! has), with `rustls`: the frames of [`super`] go unchanged inside a TLS stream.
//!
//! - A server presents `--tls-cert`/`--tls-key`; with `--tls-cacert` it requires every
//!   client to present a certificate signed by that CA.
//! - A client verifies the server against `--tls-cacert` (the server's certificate must
//!   name the host or address the client connects to); with `--tls-cert`/`--tls-key` it
//!   presents its own.
//!
//! A TLS server answers a plain client with one plain `Error` frame saying so, and a plain
//! server answers a TLS client's hello with a TLS alert (`no_application_protocol`), so a
//! mismatch is one clear error on the client, never a wait for the timeout.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConnection, ServerConnection, StreamOwned};

use crate::store::StoreError;

/// The first byte of a TLS handshake record (a client hello starts with it); a plain
/// page-server frame starts with the low byte of its length, 13 for a `Hello`.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// The TLS alert record a plain server sends a TLS client: fatal, no_application_protocol.
pub const PLAIN_SERVER_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

/// What a TLS server answers a plain client (as a plain `Error` frame).
pub const TLS_ONLY: &str = "this page server speaks TLS only: pass --tls-cacert FILE (the CA \
    that signed its certificate) and, when it requires client certificates, --tls-cert FILE \
    --tls-key FILE";

fn file_error(flag: &'static str, path: &Path, reason: String) -> StoreError {
    StoreError::TlsFile {
        flag,
        path: path.to_path_buf(),
        reason,
    }
}

fn load_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let pem =
        std::fs::read(path).map_err(|e| file_error(flag, path, format!("cannot read it: {e}")))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            flag,
            path,
            "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, StoreError> {
    let flag = "--tls-key";
    let pem =
        std::fs::read(path).map_err(|e| file_error(flag, path, format!("cannot read it: {e}")))?;
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(file_error(
            flag,
            path,
            "it holds no PEM private key (PKCS#8, PKCS#1 or SEC1; unencrypted)".into(),
        )),
        Err(e) => Err(file_error(
            flag,
            path,
            format!("not a PEM private key: {e}"),
        )),
    }
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs("--tls-cacert", path)? {
        roots.add(c).map_err(|e| {
            file_error(
                "--tls-cacert",
                path,
                format!("a certificate in it cannot be a CA: {e}"),
            )
        })?;
    }
    Ok(roots)
}

/// The certificate and key did not go together (or the key is of a kind rustls refuses).
fn pair_error(cert: &Path, key: &Path, e: rustls::Error) -> StoreError {
    let reason = match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "it is not the private key of the certificate in --tls-cert {}",
            cert.display()
        ),
        e => format!("it cannot be used with --tls-cert {}: {e}", cert.display()),
    };
    file_error("--tls-key", key, reason)
}

/// The TLS files of one side, as given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub cacert: Option<PathBuf>,
}

impl TlsFiles {
    /// No TLS option was given: plain TCP.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.cacert.is_none()
    }

    fn cert_and_key(&self) -> Result<Option<(&Path, &Path)>, StoreError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (None, None) => Ok(None),
            (Some(c), None) => Err(file_error(
                "--tls-cert",
                c,
                "given without --tls-key FILE (its private key)".into(),
            )),
            (None, Some(k)) => Err(file_error(
                "--tls-key",
                k,
                "given without --tls-cert FILE (its certificate)".into(),
            )),
        }
    }

    /// The client side, or `None` for plain TCP. `--tls-cacert` is required (the server
    /// is verified); `--tls-cert`/`--tls-key` are presented when given.
    pub fn client(&self) -> Result<Option<ClientTls>, StoreError> {
        if self.is_empty() {
            return Ok(None);
        }
        let pair = self.cert_and_key()?;
        let Some(ca) = &self.cacert else {
            // Not empty and no CA: the pair was given.
            let path = pair.map_or(Path::new(""), |(c, _)| c);
            return Err(file_error(
                "--tls-cert",
                path,
                "a page-server client over TLS also needs --tls-cacert FILE (the CA that \
                 signed the page server's certificate)"
                    .into(),
            ));
        };
        let builder = rustls::ClientConfig::builder().with_root_certificates(load_roots(ca)?);
        let cfg = match pair {
            Some((c, k)) => builder
                .with_client_auth_cert(load_certs("--tls-cert", c)?, load_key(k)?)
                .map_err(|e| pair_error(c, k, e))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Some(ClientTls(Arc::new(cfg))))
    }

    /// The server side, or `None` for plain TCP. `--tls-cert`/`--tls-key` are required;
    /// with `--tls-cacert` every client must present a certificate signed by it.
    pub fn server(&self) -> Result<Option<ServerTls>, StoreError> {
        if self.is_empty() {
            return Ok(None);
        }
        let Some((c, k)) = self.cert_and_key()? else {
            // Not empty and no pair: the CA was given.
            let ca = self.cacert.as_deref().unwrap_or(Path::new(""));
            return Err(file_error(
                "--tls-cacert",
                ca,
                "a TLS page server also needs --tls-cert FILE and --tls-key FILE (its own \
                 certificate and key)"
                    .into(),
            ));
        };
        let builder = rustls::ServerConfig::builder();
        let builder = match &self.cacert {
            Some(ca) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder(Arc::new(load_roots(ca)?))
                        .build()
                        .map_err(|e| {
                            file_error(
                                "--tls-cacert",
                                ca,
                                format!("cannot verify clients with it: {e}"),
                            )
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let cfg = builder
            .with_single_cert(load_certs("--tls-cert", c)?, load_key(k)?)
            .map_err(|e| pair_error(c, k, e))?;
        Ok(Some(ServerTls {
            config: Arc::new(cfg),
            client_certs: self.cacert.is_some(),
        }))
    }
}

/// A client's TLS configuration (cheap to clone).
#[derive(Debug, Clone)]
pub struct ClientTls(Arc<rustls::ClientConfig>);

impl ClientTls {
    /// Starts TLS on `tcp` towards `addr` (`HOST:PORT`: the server's certificate must name
    /// HOST). The handshake happens on the first read or write.
    pub fn wrap(&self, addr: &str, tcp: TcpStream) -> Result<Stream, String> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("`{host}` cannot be checked against its certificate: {e}"))?;
        let conn = ClientConnection::new(self.0.clone(), name).map_err(|e| e.to_string())?;
        Ok(Stream::Client(Box::new(StreamOwned::new(conn, Sock(tcp)))))
    }
}

/// A server's TLS configuration (cheap to clone).
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    client_certs: bool,
}

impl ServerTls {
    /// Clients must present a certificate signed by `--tls-cacert`.
    pub fn requires_client_certs(&self) -> bool {
        self.client_certs
    }

    /// Starts TLS on an accepted connection (the handshake happens on the first read).
    pub fn wrap(&self, tcp: TcpStream) -> Result<Stream, String> {
        let conn = ServerConnection::new(self.config.clone()).map_err(|e| e.to_string())?;
        Ok(Stream::Server(Box::new(StreamOwned::new(conn, Sock(tcp)))))
    }
}

/// A TCP connection whose writes never raise SIGPIPE: warmstart restores SIGPIPE's
/// default action (for `warmstart ls | head`), and a peer that closed the connection
/// must be an error (EPIPE) here, never the death of a dump or a page server.
#[derive(Debug)]
pub struct Sock(pub TcpStream);

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call, and the
        // fd is the open socket `self.0` owns.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A page-server connection: plain TCP or TLS over it. Timeouts are the TCP socket's.
pub enum Stream {
    Plain(Sock),
    Client(Box<StreamOwned<ClientConnection, Sock>>),
    Server(Box<StreamOwned<ServerConnection, Sock>>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Stream::Plain(_) => "plain",
            Stream::Client(_) | Stream::Server(_) => "tls",
        };
        write!(f, "Stream({kind}, {:?})", self.tcp())
    }
}

impl Stream {
    /// The TCP connection under it (for timeouts and shutdown).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => &s.0,
            Stream::Client(s) => &s.sock.0,
            Stream::Server(s) => &s.sock.0,
        }
    }

    /// For a TLS client: completes the handshake now (it would happen on the first write).
    pub fn handshake(&mut self) -> io::Result<()> {
        if let Stream::Client(s) = self {
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
        }
        Ok(())
    }
}

impl Drop for Stream {
    /// A TLS connection ends with a close_notify, if the socket takes it at once (never
    /// waits: not to read, nor on a peer that stopped reading).
    fn drop(&mut self) {
        match self {
            Stream::Plain(_) => {}
            Stream::Client(s) => {
                s.conn.send_close_notify();
                if s.sock.0.set_nonblocking(true).is_ok() {
                    let _ = s.conn.write_tls(&mut s.sock);
                }
            }
            Stream::Server(s) => {
                s.conn.send_close_notify();
                if s.sock.0.set_nonblocking(true).is_ok() {
                    let _ = s.conn.write_tls(&mut s.sock);
                }
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

/// What a TLS failure on a client's connection means, in words, if `e` is one.
pub fn client_error_reason(e: &io::Error) -> Option<String> {
    use rustls::{AlertDescription as A, Error as E};
    let err = e.get_ref()?.downcast_ref::<E>()?;
    Some(match err {
        E::AlertReceived(A::NoApplicationProtocol) => "it does not speak TLS (a page server \
            started without --tls-cert/--tls-key): drop the --tls-* options, or restart it \
            with them"
            .into(),
        E::AlertReceived(A::CertificateRequired) => "it requires a client certificate: pass \
            --tls-cert FILE --tls-key FILE (signed by the CA it trusts)"
            .into(),
        E::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied
            | A::DecryptError),
        ) => format!(
            "it refused this client's certificate (TLS alert {a:?}): --tls-cert must be \
             signed by the CA the page server trusts (its --tls-cacert) and be valid now"
        ),
        E::InvalidCertificate(c) => format!(
            "its TLS certificate is not trusted ({c:?}): it must be signed by the CA in \
             --tls-cacert, valid now, and name the host or address connected to"
        ),
        E::InvalidMessage(_) => "it answered the TLS handshake with something else than TLS \
            (not a TLS page server?)"
            .into(),
        other => format!("TLS failed: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(cert: Option<&str>, key: Option<&str>, cacert: Option<&str>) -> TlsFiles {
        TlsFiles {
            cert: cert.map(PathBuf::from),
            key: key.map(PathBuf::from),
            cacert: cacert.map(PathBuf::from),
        }
    }

    #[test]
    fn no_option_is_plain_tcp() {
        assert!(files(None, None, None).client().unwrap().is_none());
        assert!(files(None, None, None).server().unwrap().is_none());
    }

    #[test]
    fn incomplete_options_name_what_is_missing() {
        let e = files(Some("c.pem"), None, Some("ca.pem"))
            .client()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--tls-cert c.pem: given without --tls-key FILE (its private key)"
        );
        let e = files(None, Some("k.pem"), None).server().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--tls-key k.pem: given without --tls-cert"),
            "{e}"
        );
        let e = files(Some("c.pem"), Some("k.pem"), None)
            .client()
            .unwrap_err();
        assert!(
            e.to_string().contains("also needs --tls-cacert FILE"),
            "{e}"
        );
        let e = files(None, None, Some("ca.pem")).server().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--tls-cacert ca.pem: a TLS page server also needs --tls-cert"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_or_foreign_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let junk = d.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let j = junk.to_str().unwrap();
        let e = files(None, None, Some(j)).client().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("--tls-cacert {j}: it holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        );
        let missing = d.path().join("missing.pem");
        let m = missing.to_str().unwrap();
        let e = files(None, None, Some(m)).client().unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("--tls-cacert {m}: cannot read it")),
            "{e}"
        );
    }

    /// A plain Hello frame never starts like a TLS handshake record (the server tells
    /// them apart by the first byte).
    #[test]
    fn a_plain_hello_is_not_a_tls_record() {
        let hello = super::super::Request::Hello {
            magic: super::super::MAGIC,
            version: super::super::VERSION,
        }
        .encode();
        assert_ne!(hello[0], HANDSHAKE_RECORD);
    }
}
