//! A small HTTP/1.1 server on loopback for the webhook's tests and benchmark: real sockets,
//! real TLS (rustls) when asked, keep-alive, `Content-Length` bodies (what the plugin sends),
//! request heads parsed by `httparse`. It records every request before answering it, and
//! answers with whatever the test's responder says.

#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Instant,
};

/// One request as the server read it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the server had read it completely.
    pub at: Instant,
}

impl Request {
    /// The value of header `name` (lower case), if present once or more (the first).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }
}

/// What the server answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// `200 OK` with an empty body.
    pub fn ok() -> Self {
        Self::status(200, "")
    }

    /// `status` with `body`.
    pub fn status(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

type Responder = Box<dyn FnMut(&Request) -> Reply + Send>;

struct State {
    record: bool,
    requests: Mutex<Vec<Request>>,
    responder: Mutex<Responder>,
    count: AtomicU64,
    bytes: AtomicU64,
    stop: AtomicBool,
}

/// A running server; stops accepting when dropped.
pub struct Server {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
}

impl Server {
    /// Plain HTTP, recording requests.
    pub fn http(responder: impl FnMut(&Request) -> Reply + Send + 'static) -> Self {
        Self::start(None, true, Box::new(responder))
    }

    /// HTTPS with `tls`, recording requests.
    pub fn https(
        tls: Arc<rustls::ServerConfig>,
        responder: impl FnMut(&Request) -> Reply + Send + 'static,
    ) -> Self {
        Self::start(Some(tls), true, Box::new(responder))
    }

    /// Plain HTTP answering `200 OK` to everything and keeping only counts: as cheap as it gets,
    /// for benchmarks.
    pub fn counting() -> Self {
        Self::start(None, false, Box::new(|_| Reply::ok()))
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>, record: bool, responder: Responder) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            record,
            requests: Mutex::default(),
            responder: Mutex::new(responder),
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let accepting = state.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accepting.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = stream.set_nodelay(true);
                let state = accepting.clone();
                let tls = tls.clone();
                thread::spawn(move || {
                    let _ = match tls {
                        None => serve(stream, &state),
                        Some(config) => match rustls::ServerConnection::new(config) {
                            Ok(conn) => serve(rustls::StreamOwned::new(conn, stream), &state),
                            Err(_) => Ok(()),
                        },
                    };
                });
            }
        });
        Self {
            addr,
            scheme,
            state,
        }
    }

    /// `http://127.0.0.1:<port>` or `https://…`, followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// The requests read so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many requests were answered, and their body bytes.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.state.count.load(Ordering::Relaxed),
            self.state.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread up so that it sees the flag.
        let _ = TcpStream::connect(self.addr).map(|s| s.shutdown(Shutdown::Both));
    }
}

/// Serves requests on one connection until the client closes it.
fn serve(mut stream: impl Read + Write, state: &State) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0; 64 * 1024];
    loop {
        // Read until the head is complete.
        let (head_len, method, path, headers) = loop {
            let mut parsed = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut parsed);
            match request.parse(&buffer) {
                Ok(httparse::Status::Complete(len)) => {
                    let headers: Vec<(String, String)> = request
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (
                        len,
                        request.method.unwrap_or_default().to_owned(),
                        request.path.unwrap_or_default().to_owned(),
                        headers,
                    );
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.trim().parse().expect("a numeric content-length"))
            .unwrap_or(0);
        while buffer.len() < head_len + length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        let body = buffer[head_len..head_len + length].to_vec();
        buffer.drain(..head_len + length);

        state.count.fetch_add(1, Ordering::Relaxed);
        state.bytes.fetch_add(length as u64, Ordering::Relaxed);
        let request = Request {
            method,
            path,
            headers,
            body,
            at: Instant::now(),
        };
        let reply = (state.responder.lock().unwrap())(&request);
        if state.record {
            state.requests.lock().unwrap().push(request);
        }

        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-length: {}\r\n",
            reply.status,
            reason(reply.status),
            reply.body.len()
        );
        for (name, value) in &reply.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&reply.body);
        stream.write_all(out.as_bytes())?;
        stream.flush()?;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}
