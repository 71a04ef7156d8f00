//! Plain `http://` endpoints without a proxy: HTTP/1.1 on hyper's connection
//! API with a keep-alive pool of our own. Most of a request's client-side cost
//! through reqwest is its layers (the pooled legacy client, redirect and
//! retry services, header maps built per request); on a loopback server that
//! is most of the work of a build that sends thousands of short requests.
//! `https://` and proxied endpoints keep going through reqwest.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use std::sync::{Arc, Mutex};

type Sender = SendRequest<Full<Bytes>>;

/// One endpoint's connections: idle ones wait here between requests.
#[derive(Clone)]
pub struct Direct {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port` to connect to, and the `Host` header.
    authority: String,
    idle: Mutex<Vec<Sender>>,
}

/// A response whose body is still to be read; the connection goes back to the
/// pool once the body has been read to its end (dropped before that, it is closed).
pub struct Reply {
    pub head: http::response::Parts,
    body: hyper::body::Incoming,
    sender: Option<Sender>,
    pool: Arc<Inner>,
}

/// Why a request on a direct connection failed.
#[derive(Debug)]
pub enum Error {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "could not connect: {e}"),
            Error::Http(e) => f.write_str(&error_chain(e)),
        }
    }
}

/// An error and every cause under it, joined by `: ` (hyper's and reqwest's
/// own messages leave out the OS error that says what happened).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// A proxy variable that reqwest would honour for this host.
fn proxied(host: &str) -> bool {
    let loopback = host == "localhost"
        || host.starts_with("127.")
        || host == "::1"
        || host.ends_with(".localhost");
    if loopback {
        return false;
    }
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

impl Direct {
    /// The direct path for `url` (any path under it), when it is plain
    /// `http://` and no proxy applies; `KVT_HTTP_CLIENT=reqwest` turns it off.
    pub fn for_url(url: &str) -> Option<Direct> {
        if std::env::var("KVT_HTTP_CLIENT").is_ok_and(|v| v == "reqwest") {
            return None;
        }
        let rest = url.strip_prefix("http://")?;
        let authority = rest.split('/').next().filter(|a| !a.is_empty())?;
        if authority.contains('@') {
            return None; // credentials in the URL: reqwest turns them into a header
        }
        // `host[:port]`, the host possibly a bracketed IPv6 address.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, rest) = v6.split_once(']')?;
                (h, rest.strip_prefix(':'))
            }
            None => match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port: u16 = port.map_or(Some(80), |p| p.parse().ok())?;
        if proxied(host) {
            return None;
        }
        let authority = if authority.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Some(Direct {
            inner: Arc::new(Inner {
                authority,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// An idle connection that is still open, or a new one (and whether it was reused).
    async fn connection(&self) -> Result<(Sender, bool), Error> {
        loop {
            let idle = self.inner.idle.lock().expect("pool").pop();
            match idle {
                Some(s) if s.is_closed() => continue,
                Some(mut s) => {
                    if s.ready().await.is_ok() {
                        return Ok((s, true));
                    }
                }
                None => break,
            }
        }
        let stream = tokio::net::TcpStream::connect(&self.inner.authority)
            .await
            .map_err(Error::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(Error::Http)?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes the connection.
            let _ = conn.await;
        });
        Ok((sender, false))
    }

    /// Sends one request. A reused connection found closed before the
    /// request was written is replaced by a new one once (the request never
    /// left); any later failure is the caller's, to count as an attempt.
    pub async fn send(
        &self,
        method: http::Method,
        path: &str,
        headers: &[(&'static str, &str)],
        body: Bytes,
    ) -> Result<Reply, Error> {
        let mut fresh_tried = false;
        loop {
            let (mut sender, reused) = if fresh_tried {
                self.connect_new().await?
            } else {
                self.connection().await?
            };
            let mut req = http::Request::builder()
                .method(method.clone())
                .uri(path)
                .header(http::header::HOST, &self.inner.authority);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| Error::Connect(std::io::Error::other(e)))?;
            match sender.send_request(req).await {
                Ok(resp) => {
                    let (head, body) = resp.into_parts();
                    return Ok(Reply {
                        head,
                        body,
                        sender: Some(sender),
                        pool: self.inner.clone(),
                    });
                }
                Err(e) if reused && !fresh_tried && e.is_canceled() => {
                    fresh_tried = true;
                }
                Err(e) => return Err(Error::Http(e)),
            }
        }
    }

    async fn connect_new(&self) -> Result<(Sender, bool), Error> {
        // Every idle connection is as old as the one that just failed.
        self.inner.idle.lock().expect("pool").clear();
        self.connection().await
    }
}

impl Reply {
    pub fn status(&self) -> u16 {
        self.head.status.as_u16()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body's next piece; `None` at its end, when the connection goes
    /// back to the pool.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
                Some(Err(e)) => {
                    self.sender = None;
                    return Err(Error::Http(e));
                }
                None => {
                    if let Some(s) = self.sender.take() {
                        if !s.is_closed() {
                            self.pool.idle.lock().expect("pool").push(s);
                        }
                    }
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_goes_direct_and_the_rest_does_not() {
        let a = |u: &str| Direct::for_url(u).map(|d| d.inner.authority.clone());
        assert_eq!(
            a("http://127.0.0.1:8000/v1").as_deref(),
            Some("127.0.0.1:8000")
        );
        assert_eq!(a("http://localhost/v1").as_deref(), Some("localhost:80"));
        assert_eq!(a("http://[::1]:9/v1").as_deref(), Some("[::1]:9"));
        assert_eq!(a("http://[::1]/v1").as_deref(), Some("[::1]:80"));
        assert_eq!(a("https://api.example.com/v1"), None);
        assert_eq!(a("http://user:pw@host:1/v1"), None);
        assert_eq!(a("http://host:notaport/v1"), None);
    }
}
