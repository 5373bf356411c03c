//! The HTTP/1.1 fast path (`http::h1`) over real loopback sockets: a raw client speaking
//! HTTP/1.1 byte for byte to the router, and a scripted raw node whose every answer's
//! framing the test chooses (chunked with trailers, close-delimited, interim 1xx, malformed).
//! What must hold: every answer arrives whole and in order, connections are reused only when
//! clean, the node sees the proxy's headers and none of the client's forgeries, requests the
//! path does not carry move the connection to hyper without losing a byte, and shutdown
//! closes idle connections.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{admin_json, config, expect_error, heartbeat, proxy_config, TestRouter};
use roomrouter::config::{Config, FrontDoorMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A node that answers every request with the next of its scripted responses (the last one
/// repeats), recording each request it got. Closes a connection after a response that has
/// no length (close-delimited) and when the script says so.
struct RawNode {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    connections: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawNode {
    async fn start(script: Vec<&'static str>) -> RawNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (s, c) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            let next = Arc::new(Mutex::new(0usize));
            // Bounded: the test aborts the task when the node is dropped.
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                *c.lock().unwrap() += 1;
                let (s, script, next) = (s.clone(), script.clone(), next.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    // At most 100 requests per connection; tests send a few.
                    for _ in 0..100 {
                        let Some(req) = read_request(&mut sock, &mut buf).await else {
                            return;
                        };
                        s.lock().unwrap().push(req);
                        let i = {
                            let mut n = next.lock().unwrap();
                            *n += 1;
                            (*n - 1).min(script.len() - 1)
                        };
                        let resp = script[i];
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        let lower = resp.to_ascii_lowercase();
                        // The final head decides: interim (1xx) answers before it do not end
                        // the exchange.
                        let head = lower
                            .split("\r\n\r\n")
                            .find(|h| !h.starts_with("http/1.1 1"))
                            .unwrap_or("");
                        if head.contains("connection: close")
                            || !head.contains("content-length")
                                && !head.contains("transfer-encoding")
                        {
                            return;
                        }
                    }
                });
            }
        });
        RawNode {
            url,
            seen,
            connections,
            task,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }

    async fn register(&self, r: &TestRouter, id: &str) {
        let body = serde_json::json!({"url": self.url, "capacity": 100, "load": 0});
        assert_eq!(heartbeat(r, id, body).await.status(), 200);
    }
}

impl Drop for RawNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head, then a `Content-Length` body) off `sock`; `None` at EOF.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_string();
            let lower = head.to_ascii_lowercase();
            if lower.contains("\r\ntransfer-encoding: chunked\r\n") {
                // Tests send one-chunk bodies: up to the last chunk and the empty trailer.
                let end = loop {
                    if let Some(i) = find(buf, b"0\r\n\r\n") {
                        break i + 5;
                    }
                    read_some(sock, buf).await?;
                };
                let all: Vec<u8> = buf.drain(..end).collect();
                return Some(String::from_utf8_lossy(&all).to_string());
            }
            let len = lower
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>())
                })
                .and_then(Result::ok)
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                read_some(sock, buf).await?;
            }
            let all: Vec<u8> = buf.drain(..end + 4 + len).collect();
            return Some(String::from_utf8_lossy(&all).to_string());
        }
        read_some(sock, buf).await?;
    }
}

async fn read_some(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
        _ => None,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A raw client connection to the router.
struct Raw {
    sock: TcpStream,
    buf: Vec<u8>,
}

/// One response as the client read it.
#[derive(Debug)]
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

impl Raw {
    async fn connect(r: &TestRouter) -> Raw {
        Raw {
            sock: TcpStream::connect(r.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &str) {
        self.sock.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// Reads one response: head, then a body by `Content-Length`, by chunks (decoded), or
    /// until the router closes.
    async fn answer(&mut self) -> Answer {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            assert!(
                read_some(&mut self.sock, &mut self.buf).await.is_some(),
                "connection ended before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end + 4]).to_string();
        self.buf.drain(..end + 4);
        let a = Answer {
            head,
            body: Vec::new(),
        };
        let body = if let Some(len) = a.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(read_some(&mut self.sock, &mut self.buf).await.is_some());
            }
            self.buf.drain(..len).collect()
        } else if a.header("transfer-encoding").is_some_and(|te| {
            te.rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
        }) {
            self.chunked().await
        } else {
            while read_some(&mut self.sock, &mut self.buf).await.is_some() {}
            std::mem::take(&mut self.buf)
        };
        Answer { body, ..a }
    }

    async fn chunked(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                assert!(read_some(&mut self.sock, &mut self.buf).await.is_some());
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            self.buf.drain(..line + 2);
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        let empty = i == 0;
                        self.buf.drain(..i + 2);
                        if empty {
                            return out;
                        }
                        continue;
                    }
                    assert!(read_some(&mut self.sock, &mut self.buf).await.is_some());
                }
            }
            while self.buf.len() < size + 2 {
                assert!(read_some(&mut self.sock, &mut self.buf).await.is_some());
            }
            out.extend(self.buf.drain(..size));
            assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
        }
    }

    /// Whether the router closed the connection (EOF within 5 s, nothing more sent).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.sock.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A proxy-mode router, a scripted node registered with it as `n1`, and a raw client
/// connection to the router.
async fn cluster(script: Vec<&'static str>) -> (TestRouter, RawNode, Raw) {
    cluster_with(proxy_config(), script).await
}

async fn cluster_with(cfg: Config, script: Vec<&'static str>) -> (TestRouter, RawNode, Raw) {
    let r = TestRouter::start(cfg).await;
    let node = RawNode::start(script).await;
    node.register(&r, "n1").await;
    let c = Raw::connect(&r).await;
    (r, node, c)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: router.test\r\n\r\n")
}

/// Stops `r` and checks that the stop closes `c` (`closed` says which connection, for
/// `what`) and returns within 5 s (`returns` says why it should).
async fn stop_closing(r: TestRouter, c: &mut Raw, what: &str, closed: &str, returns: &str) {
    let stopped = tokio::spawn(r.stop());
    assert!(c.closed().await, "{what}: {closed}");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .unwrap_or_else(|_| panic!("{what}: {returns}"))
        .unwrap();
}

/// `room` has no pin: a refused request placed nothing.
async fn assert_not_placed(r: &TestRouter, room: &str) {
    let pin = r
        .admin(reqwest::Method::GET, &format!("/v1/rooms/{room}"))
        .send()
        .await
        .unwrap();
    expect_error(pin, 404, "not_found").await;
}

async fn fast_requests(r: &TestRouter) -> u64 {
    metric(r, "roomrouter_http_fast_path_requests_total").await
}

async fn metric(r: &TestRouter, name: &str) -> u64 {
    let text = r.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in\n{text}"))
}

/// A chunked answer that also carries a `Content-Length` (which RFC 9112 says chunked
/// overrides, and a proxy must remove) arrives whole and without the length, on both
/// paths: hyper's client decodes the chunks but leaves the header, and hyper's server then
/// framed the body by it (cut short, or the connection aborted). Such an answer ends its
/// node connection (RFC 9112 calls it an error, and hyper's client and HAProxy do not
/// reuse one); a plain chunked answer with trailers leaves it for the next request.
#[tokio::test]
async fn chunked_answers_with_trailers_arrive_whole_and_the_node_connection_is_reused() {
    const BOTH: &str = concat!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        "Trailer: X-Sum\r\n\r\n",
        "5;x=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Sum: 12\r\n\r\n"
    );
    const CHUNKED: &str = concat!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n",
        "5;x=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Sum: 12\r\n\r\n"
    );
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        let (r, node, mut c) = cluster_with(cfg, vec![BOTH, BOTH, CHUNKED]).await;
        for i in 0..5 {
            c.send(&get(&format!("/rooms/chunky?i={i}"))).await;
            let a = c.answer().await;
            assert_eq!(a.status(), 200, "fast path {fast_path}: {a:?}");
            assert_eq!(a.body, b"hello, world", "fast path {fast_path}");
            assert_eq!(a.header("x-room-node").as_deref(), Some("n1"));
            assert_eq!(
                a.header("content-length"),
                None,
                "fast path {fast_path}: chunked wins over a length"
            );
            // End to end (RFC 9110 section 6.6.2), not hop-by-hop: it announces the trailer
            // fields that follow the body.
            assert_eq!(
                a.header("trailer").as_deref(),
                Some("X-Sum"),
                "fast path {fast_path}"
            );
        }
        if fast_path {
            assert_eq!(
                node.connections(),
                3,
                "one node connection for each answer with both, then one for the rest"
            );
        }
        assert_eq!(fast_requests(&r).await, if fast_path { 5 } else { 0 });
        r.stop().await;
    }
}

/// A node's `Transfer-Encoding` split over lines, one of them empty, reaches the client as
/// one line with the codings the router framed the body by: hyper's client reads only the
/// last line, and took `chunked` then an empty line for no coding (a body until close: the
/// client hung, or read the next answer as this one's body). The fast path only: hyper's
/// path reads such an answer with hyper's client, as a body until the node closes (its
/// connection is not reused, the client gets the chunks undecoded).
#[tokio::test]
async fn a_nodes_codings_over_several_lines_reach_the_client_as_one() {
    let (r, _node, mut c) = cluster(vec![concat!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
        "5\r\nhello\r\n0\r\n\r\n"
    )])
    .await;
    for i in 0..2 {
        c.send(&get(&format!("/rooms/te?i={i}"))).await;
        let a = c.answer().await;
        assert_eq!(a.status(), 200, "{a:?}");
        assert_eq!(a.body, b"hello");
        let codings: Vec<&str> = a
            .head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:"))
            .collect();
        assert_eq!(codings, ["transfer-encoding: chunked"], "{}", a.head);
    }
    r.stop().await;
}

#[tokio::test]
async fn a_close_delimited_answer_ends_both_connections() {
    let (r, node, mut c) =
        cluster(vec!["HTTP/1.1 200 OK\r\nX-Kind: eof\r\n\r\nuntil the end"]).await;
    c.send(&get("/rooms/eof")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 200);
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert_eq!(a.body, b"until the end");
    // A second client gets a new node connection: the first one ended with its answer.
    let mut c = Raw::connect(&r).await;
    c.send(&get("/rooms/eof")).await;
    assert_eq!(c.answer().await.body, b"until the end");
    assert_eq!(node.connections(), 2);
    r.stop().await;
}

/// A close-delimited answer the node stops sending half-way (it stalls past
/// `proxy.idle_timeout`) ends the client's connection with a reset, not a FIN: the client
/// must not take the part it got for the whole.
#[tokio::test]
async fn a_close_delimited_answer_cut_half_way_ends_the_client_connection_with_a_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let node = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        read_request(&mut sock, &mut buf).await.unwrap();
        sock.write_all(b"HTTP/1.1 200 OK\r\n\r\nthe first half")
            .await
            .unwrap();
        // Stalls with the connection open (bounded: the test aborts it).
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let mut cfg = proxy_config();
    cfg.proxy.idle_timeout = Duration::from_millis(300);
    let r = TestRouter::start(cfg).await;
    let body = serde_json::json!({"url": url, "capacity": 100, "load": 0});
    assert_eq!(heartbeat(&r, "n1", body).await.status(), 200);
    let mut c = Raw::connect(&r).await;
    c.send(&get("/rooms/cut")).await;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), c.sock.read(&mut chunk)).await {
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => break Err(e.kind()),
            Err(_) => panic!("the router neither finished nor cut the answer"),
        }
    };
    assert!(
        String::from_utf8_lossy(&got).ends_with("the first half"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "a reset, not a clean end"
    );
    node.abort();
    r.stop().await;
}

#[tokio::test]
async fn interim_answers_are_skipped_and_pipelined_requests_answered_in_order() {
    let (r, node, mut c) = cluster(vec![
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        "HTTP/1.1 201 Created\r\nContent-Length: 6\r\n\r\nsecond",
        "HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nthird",
    ])
    .await;
    // Three requests in one write, the second with a body.
    c.send(&format!(
        "{}POST /rooms/p HTTP/1.1\r\nHost: router.test\r\nContent-Length: 4\r\n\r\nbody{}",
        get("/rooms/p?n=1"),
        get("/rooms/p?n=3")
    ))
    .await;
    let got: Vec<(u16, Vec<u8>)> = [c.answer().await, c.answer().await, c.answer().await]
        .into_iter()
        .map(|a| (a.status(), a.body))
        .collect();
    assert_eq!(
        got,
        [
            (200, b"first".to_vec()),
            (201, b"second".to_vec()),
            (404, b"third".to_vec())
        ]
    );
    let seen = node.seen();
    assert!(
        seen[0].starts_with("GET /rooms/p?n=1 HTTP/1.1\r\n"),
        "{seen:?}"
    );
    assert!(
        seen[1].starts_with("POST /rooms/p HTTP/1.1\r\n"),
        "{seen:?}"
    );
    assert!(seen[1].ends_with("\r\n\r\nbody"), "{seen:?}");
    assert!(
        seen[2].starts_with("GET /rooms/p?n=3 HTTP/1.1\r\n"),
        "{seen:?}"
    );
    r.stop().await;
}

#[tokio::test]
async fn the_node_sees_the_proxys_headers_and_none_of_the_clients_forgeries() {
    let (r, node, mut c) = cluster(vec![
        "HTTP/1.1 204 No Content\r\nX-Room-Node: forged\r\n\r\n",
    ])
    .await;
    c.send(concat!(
        "GET /rooms/hdr HTTP/1.1\r\nHost: router.test\r\nConnection: keep-alive, x-private\r\n",
        "X-Private: 1\r\nX-Room-Ticket: forged\r\nX-Room-Node: forged\r\n",
        "X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Proto: gopher\r\nCookie: a=b\r\n",
        // The same names with `_`, which CGI-style node stacks read as `-`.
        "X_Room_Ticket: forged\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n"
    ))
    .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 204);
    assert_eq!(a.header("x-room-node").as_deref(), Some("n1"));
    let seen = node.seen().remove(0).to_ascii_lowercase();
    let authority = node.url.trim_start_matches("http://");
    assert!(
        seen.contains(&format!("\r\nhost: {authority}\r\n")),
        "{seen}"
    );
    assert!(
        seen.contains("\r\nx-forwarded-for: 10.9.9.9, 127.0.0.1\r\n"),
        "{seen}"
    );
    assert!(seen.contains("\r\nx-forwarded-proto: http\r\n"), "{seen}");
    assert!(
        seen.contains("\r\nx-forwarded-host: router.test\r\n"),
        "{seen}"
    );
    assert!(seen.contains("\r\ncookie: a=b\r\n"), "{seen}");
    for gone in [
        "x-private",
        "connection:",
        "forged",
        "gopher",
        "x_forwarded_for",
        "6.6.6.6",
    ] {
        assert!(!seen.contains(gone), "{gone} reached the node: {seen}");
    }
    let ticket = seen
        .lines()
        .find_map(|l| l.strip_prefix("x-room-ticket: "))
        .expect("a ticket");
    assert_eq!(ticket.split('.').count(), 3, "a JWT: {ticket}");
    r.stop().await;
}

/// Framing and hop-by-hop headers spelled with `_` for `-` (`Transfer_Encoding`,
/// `Content_Length`) reach the node on neither path: a node stack that reads `_` as `-`
/// would frame the body otherwise than the router did (`Transfer_Encoding: chunked` on a
/// body framed by `Content-Length`), and take what follows for a request the router never
/// admitted. Other names with `_` pass.
#[tokio::test]
async fn framing_headers_spelled_with_underscores_never_reach_the_node() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        let (r, node, mut c) =
            cluster_with(cfg, vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        c.send(concat!(
            "POST /rooms/u HTTP/1.1\r\nHost: router.test\r\nContent-Length: 5\r\n",
            "Transfer_Encoding: chunked\r\nContent_Length: 0\r\nKeep_Alive: 1\r\n",
            "Proxy_Connection: x\r\nX_Custom: kept\r\n\r\n0\r\n\r\n",
        ))
        .await;
        let a = c.answer().await;
        assert_eq!(a.status(), 200, "fast path {fast_path}: {a:?}");
        let seen = node.seen().remove(0).to_ascii_lowercase();
        for gone in [
            "transfer_encoding",
            "content_length",
            "keep_alive",
            "proxy_connection",
        ] {
            assert!(
                !seen.contains(gone),
                "fast path {fast_path}: {gone} reached the node: {seen}"
            );
        }
        assert!(seen.contains("\r\nx_custom: kept\r\n"), "{seen}");
        assert!(seen.contains("\r\ncontent-length: 5\r\n"), "{seen}");
        assert!(seen.ends_with("\r\n\r\n0\r\n\r\n"), "{seen}");
        r.stop().await;
    }
}

/// A request's length reaches the node as the number the router framed its body by, on
/// both paths: `0005` as the client wrote it was passed on, for the node's parser to read
/// as it will (an octal reading, a refusal).
#[tokio::test]
async fn the_node_gets_the_length_as_the_router_read_it() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        let (r, node, mut c) =
            cluster_with(cfg, vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        c.send("POST /rooms/l HTTP/1.1\r\nHost: router.test\r\nContent-Length: 00010\r\n\r\n0123456789")
            .await;
        let a = c.answer().await;
        assert_eq!(a.status(), 200, "fast path {fast_path}: {a:?}");
        let seen = node.seen().remove(0).to_ascii_lowercase();
        assert!(
            seen.contains("\r\ncontent-length: 10\r\n") && !seen.contains("00010"),
            "fast path {fast_path}: {seen}"
        );
        assert!(seen.ends_with("\r\n\r\n0123456789"), "{seen}");
        r.stop().await;
    }
}

/// `Connection` may name headers to drop on the way, but not the length that frames a body:
/// a request that listed `Content-Length` there lost it on the way to the node, which then
/// read the body as a second request, one the router never admitted, carrying whatever
/// ticket and forwarding headers the client wrote (request smuggling). Nor may a node's
/// answer lose its length so: the client could not tell where the body ends.
#[tokio::test]
async fn a_connection_header_cannot_strip_the_length_that_frames_a_body() {
    let (r, node, mut c) = cluster(vec![
        "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
    ])
    .await;
    let smuggled =
        "GET /rooms/other HTTP/1.1\r\nHost: n\r\nX-Room-Ticket: forged\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
    c.send(&format!(
        "POST /rooms/s HTTP/1.1\r\nHost: router.test\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    ))
    .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 200);
    assert_eq!(a.header("content-length").as_deref(), Some("5"), "{a:?}");
    assert_eq!(a.body, b"hello");
    // The connection goes on: the client knew where the answer ended.
    c.send(&get("/rooms/s")).await;
    assert_eq!(c.answer().await.status(), 200);
    let seen = node.seen();
    assert_eq!(seen.len(), 2, "no request but the client's two: {seen:?}");
    let first = seen[0].to_ascii_lowercase();
    assert!(
        first.contains(&format!("\r\ncontent-length: {}\r\n", smuggled.len())),
        "{first}"
    );
    assert!(first.ends_with(&smuggled.to_ascii_lowercase()), "{first}");
    assert!(seen[1].starts_with("GET /rooms/s "), "{seen:?}");
    r.stop().await;
}

#[tokio::test]
async fn a_body_sent_in_pieces_reaches_the_node_whole() {
    let (r, node, mut c) = cluster(vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
    let body = "x".repeat(100_000);
    c.send(&format!(
        "PUT /rooms/up HTTP/1.1\r\nHost: router.test\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..10]
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(&body[10..]).await;
    let a = c.answer().await;
    assert_eq!((a.status(), a.body.as_slice()), (200, &b"ok"[..]));
    let seen = node.seen().remove(0);
    assert!(seen.ends_with(&format!("\r\n\r\n{body}")), "the whole body");
    r.stop().await;
}

#[tokio::test]
async fn a_malformed_node_answer_is_a_502_and_the_connection_goes_on() {
    let (r, _node, mut c) = cluster(vec!["SSH-2.0-OpenSSH_9.2\r\n\r\n"]).await;
    // A POST whose body went to the node, pipelined with a GET: the GET must be read from
    // where the POST's body ended.
    c.send(&format!(
        "POST /rooms/bad HTTP/1.1\r\nHost: router.test\r\nContent-Length: 4\r\n\r\nabcd{}",
        get("/rooms/bad")
    ))
    .await;
    for _ in 0..2 {
        let a = c.answer().await;
        assert_eq!(a.status(), 502, "{a:?}");
        let e: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(e["error"], "upstream_unavailable");
    }
    r.stop().await;
}

#[tokio::test]
async fn requests_the_fast_path_does_not_carry_move_the_connection_to_hyper() {
    let (r, node, mut c) = cluster(vec!["HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnode"]).await;
    c.send(&get("/rooms/mixed")).await;
    assert_eq!(c.answer().await.body, b"node");
    // The admin API on the same connection, pipelined before a chunked upload: hyper's from
    // here.
    c.send(&format!(
        "GET /v1/rooms/mixed HTTP/1.1\r\nHost: router.test\r\nAuthorization: Bearer {}\r\n\r\n{}",
        common::ADMIN,
        concat!(
            "POST /rooms/mixed HTTP/1.1\r\nHost: router.test\r\nTransfer-Encoding: chunked\r\n\r\n",
            "3\r\nabc\r\n0\r\n\r\n"
        )
    ))
    .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["node"], "n1");
    let a = c.answer().await;
    assert_eq!((a.status(), a.body.as_slice()), (200, &b"node"[..]));
    assert!(node.seen()[1].contains("abc"), "{:?}", node.seen());
    // The chunked upload after the handoff was hyper's: one request on the fast path. (Every
    // connection that starts with the API counts as a handoff, the metrics scrape's too.)
    assert_eq!(fast_requests(&r).await, 1);
    assert!(metric(&r, "roomrouter_http_fast_path_handoffs_total").await >= 1);
    r.stop().await;
}

#[tokio::test]
async fn redirects_and_errors_are_answered_on_the_fast_path_too() {
    let mut cfg = common::config();
    cfg.front_door.mode = FrontDoorMode::Redirect;
    let r = TestRouter::start(cfg).await;
    let _n = r.node("n1", 100.0).await;
    common::eventually("n1 healthy", Duration::from_secs(5), || async {
        r.get("/readyz").send().await.unwrap().status() == 200
    })
    .await;
    let mut c = Raw::connect(&r).await;
    c.send(&get("/rooms/redir?x=1")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 307, "{a:?}");
    let loc = a.header("location").unwrap();
    assert!(loc.contains("/rooms/redir?x=1&ticket="), "{loc}");
    assert!(a.header("date").is_some());
    // A bad room, then a POST redirect mode refuses: JSON errors, connection kept.
    c.send(&get("/rooms/%00")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 400);
    assert!(String::from_utf8_lossy(&a.body).contains("invalid_room"));
    c.send("POST /rooms/redir HTTP/1.1\r\nHost: router.test\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    assert_eq!(c.answer().await.status(), 405);
    c.send(&get("/rooms/redir")).await;
    assert_eq!(c.answer().await.status(), 307);
    assert_eq!(fast_requests(&r).await, 4);
    r.stop().await;
}

#[tokio::test]
async fn with_the_fast_path_off_hyper_carries_everything() {
    let mut cfg = proxy_config();
    cfg.server.fast_path = false;
    let (r, _node, mut c) = cluster_with(
        cfg,
        vec![concat!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "2\r\nok\r\n0\r\n\r\n"
        )],
    )
    .await;
    c.send(&get("/rooms/slow-path")).await;
    let a = c.answer().await;
    assert_eq!((a.status(), a.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(fast_requests(&r).await, 0);
    r.stop().await;
}

/// An absolute-form target with a query and no path (`http://host?room=a`, as a proxy may
/// send it) reaches the node as `/?room=a` on both proxy paths; the fast path used to send
/// `GET ?room=a`, an invalid request line.
#[tokio::test]
async fn an_absolute_form_target_without_a_path_reaches_the_node_in_origin_form() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        let (r, node, mut c) =
            cluster_with(cfg, vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        c.send("GET http://router.test?room=abs HTTP/1.1\r\nHost: router.test\r\n\r\n")
            .await;
        assert_eq!(c.answer().await.body, b"ok", "fast path {fast_path}");
        let seen = node.seen();
        assert!(
            seen[0].starts_with("GET /?room=abs HTTP/1.1\r\n"),
            "fast path {fast_path}: {seen:?}"
        );
        assert_eq!(fast_requests(&r).await, u64::from(fast_path));
        r.stop().await;
    }
}

/// A `#` in the target (never sent by a browser; httparse takes it) routes as hyper routes
/// it, fragment dropped: `/healthz#` is the router's own health check on both paths, not a
/// front-door request forwarded to the room's node as the fast path used to.
#[tokio::test]
async fn a_fragment_in_the_target_does_not_change_the_route() {
    let (r, node, mut c) = cluster(vec!["HTTP/1.1 204 No Content\r\n\r\n"]).await;
    c.send("GET /healthz#x HTTP/1.1\r\nHost: router.test\r\nX-Room: abc\r\n\r\n")
        .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["status"], "ok");
    assert!(node.seen().is_empty(), "{:?}", node.seen());
    r.stop().await;
}

/// A transfer coding besides chunked (`gzip`) reaches the client with the bytes it applies
/// to, on both proxy paths: dropped as hop-by-hop, it would leave the client gzip bytes to
/// take for plain content.
#[tokio::test]
async fn transfer_codings_besides_chunked_reach_the_client() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        let (r, _node, mut c) = cluster_with(
            cfg,
            vec!["HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
        )
        .await;
        c.send(&get("/rooms/coded")).await;
        let a = c.answer().await;
        assert_eq!(
            a.header("transfer-encoding").as_deref(),
            Some("gzip, chunked"),
            "fast path {fast_path}: {a:?}"
        );
        assert_eq!(a.body, b"hello", "fast path {fast_path}");
        r.stop().await;
    }
}

/// The same answer to an HTTP/1.0 client (served by hyper), which cannot be told of a
/// transfer coding: refused (502) rather than the gzip bytes passed off as the content.
#[tokio::test]
async fn a_transfer_coding_an_http_1_0_client_cannot_carry_is_refused() {
    let (r, _node, mut c) = cluster_with(
        proxy_config(),
        vec!["HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
    )
    .await;
    c.send("GET /rooms/coded HTTP/1.0\r\nHost: router.test\r\n\r\n")
        .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 502, "{a:?}");
    assert!(
        String::from_utf8_lossy(&a.body).contains("upstream_unavailable"),
        "{a:?}"
    );
    r.stop().await;
}

/// A node's 204 that carries a `Content-Length` (RFC 9110 forbids it) reaches the client
/// without it on both paths, and the connection carries the next answer whole: a client
/// that took the length would read the next response as this one's body. The fast path
/// does not reuse that node connection either, as the announced body may still come.
#[tokio::test]
async fn a_204_reaches_the_client_without_a_length() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        cfg.validate().unwrap();
        let (r, node, mut c) = cluster_with(
            cfg,
            vec![
                "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
            ],
        )
        .await;
        c.send(&get("/rooms/empty")).await;
        let end = loop {
            if let Some(end) = find(&c.buf, b"\r\n\r\n") {
                break end;
            }
            assert!(read_some(&mut c.sock, &mut c.buf).await.is_some());
        };
        let head = String::from_utf8_lossy(&c.buf[..end]).to_ascii_lowercase();
        c.buf.drain(..end + 4);
        assert!(head.starts_with("http/1.1 204"), "{head}");
        assert!(
            !head.contains("content-length"),
            "fast path {fast_path}: {head}"
        );
        c.send(&get("/rooms/empty")).await;
        let a = c.answer().await;
        assert_eq!(
            (a.status(), &a.body[..]),
            (200, &b"next"[..]),
            "fast path {fast_path}"
        );
        if fast_path {
            // The body it announced may yet come: the node's connection is not reused.
            assert_eq!(node.connections(), 2);
        }
        r.stop().await;
    }
}

/// A node's answer whose length is one value repeated (`Content-Length: 5, 5`, which RFC
/// 9110 lets a recipient take as `5`, and hyper's client does), or whose length comes with
/// a `Transfer-Encoding` that overrides it, is relayed on both paths: the fast path refused
/// them, answering a 502 that hyper's path did not and counting a failure against the node.
#[tokio::test]
async fn a_length_repeated_or_overridden_by_the_node_is_relayed_on_both_paths() {
    for fast_path in [true, false] {
        let what = format!("fast path {fast_path}");
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        cfg.validate().unwrap();
        let (r, _node, mut c) = cluster_with(
            cfg,
            vec![
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
                concat!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
                    "5\r\nworld\r\n0\r\n\r\n"
                ),
            ],
        )
        .await;
        c.send(&get("/rooms/lengths")).await;
        let a = c.answer().await;
        assert_eq!(
            (a.status(), &a.body[..]),
            (200, &b"hello"[..]),
            "{what}: {a:?}"
        );
        assert_eq!(
            a.header("content-length").as_deref(),
            Some("5"),
            "{what}: {a:?}"
        );
        c.send(&get("/rooms/lengths")).await;
        let a = c.answer().await;
        assert_eq!(
            (a.status(), &a.body[..]),
            (200, &b"world"[..]),
            "{what}: {a:?}"
        );
        assert_eq!(a.header("content-length"), None, "{what}: {a:?}");
        assert_eq!(
            metric(&r, "roomrouter_proxy_upstream_failures_total").await,
            0,
            "{what}"
        );
        r.stop().await;
    }
}

/// A node's answer without a `Date` gets one on its way to the client, on both paths: RFC
/// 9110 (6.6.1) asks it of a proxy, and hyper's path always added it.
#[tokio::test]
async fn a_relayed_answer_without_a_date_gets_one_on_both_paths() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        cfg.validate().unwrap();
        let script = vec!["HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"];
        let (r, _node, mut c) = cluster_with(cfg, script).await;
        c.send(&get("/rooms/undated")).await;
        let a = c.answer().await;
        assert_eq!(a.status(), 200, "{a:?}");
        let date = a.header("date");
        assert!(
            date.is_some_and(|d| httpdate::parse_http_date(&d).is_ok()),
            "fast path {fast_path}: {a:?}"
        );
        if fast_path {
            assert_eq!(fast_requests(&r).await, 1);
        }
        r.stop().await;
    }
}

/// The combinations the shutdown tests run: fast path on and off, one event loop and two.
const STOPPING: [(bool, usize); 4] = [(true, 1), (false, 1), (true, 2), (false, 2)];

/// `proxy_config()` with the fast path on or off, on `loops` event loops, with a shutdown
/// grace of `grace`.
fn stopping(fast_path: bool, loops: usize, grace: Duration) -> Config {
    let mut cfg = proxy_config();
    cfg.server.fast_path = fast_path;
    cfg.server.worker_threads = Some(loops);
    cfg.server.shutdown_grace = grace;
    cfg.validate().unwrap();
    cfg
}

/// Idle connections are closed at once at shutdown, and the stop returns without waiting
/// out the grace: on both paths, with one event loop or several.
#[tokio::test]
async fn shutdown_closes_idle_fast_path_connections() {
    for (fast_path, loops) in STOPPING {
        let cfg = stopping(fast_path, loops, Duration::from_secs(30));
        let script = vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"];
        let (r, _node, mut c) = cluster_with(cfg, script).await;
        c.send(&get("/rooms/idle")).await;
        assert_eq!(c.answer().await.body, b"ok");
        let what = format!("fast path {fast_path}, {loops} loops");
        stop_closing(
            r,
            &mut c,
            &what,
            "the idle connection is closed at shutdown",
            "shutdown does not wait out the grace period",
        )
        .await;
    }
}

/// A connection that has not sent a byte when the server stops (a browser's preconnect) is
/// closed at once, whatever `server.header_read_timeout` would have allowed it: it asked for
/// nothing, so the stop does not wait for it.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_connection_that_sent_nothing() {
    for (fast_path, loops) in STOPPING {
        let mut cfg = stopping(fast_path, loops, Duration::from_secs(30));
        cfg.server.header_read_timeout = Duration::from_secs(30);
        let r = TestRouter::start(cfg).await;
        let mut c = Raw::connect(&r).await;
        // Served (accepted and waiting for its first bytes) before the stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let what = format!("fast path {fast_path}, {loops} loops");
        stop_closing(
            r,
            &mut c,
            &what,
            "the silent connection is closed at shutdown",
            "shutdown does not wait for a connection that asked for nothing",
        )
        .await;
    }
}

/// A request whose head was still coming in when the server began to stop, and that the
/// fast path hands to hyper (an API call, a heartbeat, an upgrade), is answered with
/// `connection: close`, as hyper answers one it was reading when the drain began. Handed
/// over after the drain began, hyper-util's protocol detection was cancelled before it
/// looked at the bytes already read: the client got a close and no answer.
#[tokio::test]
async fn a_head_still_arriving_when_the_server_stops_is_answered_before_the_close() {
    for fast_path in [true, false] {
        let what = format!("fast path {fast_path}");
        let r = TestRouter::start(stopping(fast_path, 1, Duration::from_secs(5))).await;
        // A keep-alive connection left idle: its close tells that the drain has begun.
        let mut idle = Raw::connect(&r).await;
        idle.send(&get("/healthz")).await;
        assert_eq!(idle.answer().await.status(), 200, "{what}");
        let mut c = Raw::connect(&r).await;
        c.send("GET /healthz HTTP/1.1\r\nHost: router.test\r\n")
            .await;
        // Read (the connection is busy) before the stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = tokio::spawn(r.stop());
        assert!(idle.closed().await, "{what}: the drain has begun");
        c.send("\r\n").await;
        let a = c.answer().await;
        assert_eq!(a.status(), 200, "{what}: {a:?}");
        assert_eq!(a.header("connection").as_deref(), Some("close"), "{what}");
        assert!(c.closed().await, "{what}");
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .unwrap_or_else(|_| panic!("{what}: the stop returns once it is answered"))
            .unwrap();
    }
}

/// A connection still busy when `server.shutdown_grace` is over (a node's answer that
/// never ends) is closed then, on both paths and with one event loop or several, and the
/// server's stop returns: a drained server leaves no connection behind.
#[tokio::test]
async fn a_connection_still_busy_when_the_grace_is_over_is_closed() {
    for (fast_path, loops) in STOPPING {
        let cfg = stopping(fast_path, loops, Duration::from_millis(300));
        let (r, _node, mut c) = cluster_with(
            cfg,
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nthe first part"],
        )
        .await;
        c.send(&get("/rooms/endless")).await;
        while find(&c.buf, b"the first part").is_none() {
            assert!(
                read_some(&mut c.sock, &mut c.buf).await.is_some(),
                "fast path {fast_path}, {loops} loops: the answer's start arrives"
            );
        }
        let what = format!("fast path {fast_path}, {loops} loops");
        stop_closing(
            r,
            &mut c,
            &what,
            "the busy connection is closed once the grace is over",
            "the stop returns soon after the grace",
        )
        .await;
    }
}

#[tokio::test]
async fn a_client_that_stalls_mid_head_is_cut_after_the_header_timeout() {
    let mut cfg = proxy_config();
    cfg.server.header_read_timeout = Duration::from_millis(300);
    let r = TestRouter::start(cfg).await;
    let mut c = Raw::connect(&r).await;
    c.send("GET /rooms/a HTTP/1.1\r\nHost: rou").await;
    let t = std::time::Instant::now();
    assert!(c.closed().await);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    r.stop().await;
}

/// A head over `server.max_header_bytes` (16 KiB by default) gets 431 on this path too,
/// also when its last piece comes in one read that takes it past the limit at once.
#[tokio::test]
async fn a_head_over_the_limit_is_refused_even_when_one_read_completes_it() {
    let (r, node, mut c) = cluster(vec!["HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnode"]).await;
    c.send(&format!(
        "GET /rooms/big HTTP/1.1\r\nHost: router.test\r\nX-Pad-1: {}\r\n",
        "a".repeat(15_800)
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(&format!("X-Pad-2: {}\r\n\r\n", "b".repeat(8_000)))
        .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 431, "{a:?}");
    assert!(node.seen().is_empty(), "{:?}", node.seen().len());
    r.stop().await;
}

#[tokio::test]
async fn placement_lookups_are_answered_on_the_fast_path() {
    let (r, _node, mut c) = cluster(vec!["HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]).await;
    c.send(&get("/v1/placement/looked-up")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(
        (v["node"].as_str(), v["created"].as_bool()),
        (Some("n1"), Some(true))
    );
    assert_eq!(a.header("x-room-node").as_deref(), Some("n1"));
    c.send(&get("/v1/placement/looked-up")).await;
    let v: serde_json::Value = serde_json::from_slice(&c.answer().await.body).unwrap();
    assert_eq!(v["created"], false, "the second lookup finds the pin");
    c.send(&get("/v1/placement/never-seen?create=false")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 404);
    assert!(String::from_utf8_lossy(&a.body).contains("not_found"));
    assert_eq!(fast_requests(&r).await, 3);
    r.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_that_dies_unanswered_is_retried_only_for_idempotent_requests() {
    for (method, retried) in [("GET", true), ("POST", false)] {
        let (r, node, mut c) = cluster(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nretry",
        ])
        .await;
        c.send(&get("/rooms/flaky")).await;
        assert_eq!(c.answer().await.body, b"ok");
        c.send(&format!(
            "{method} /rooms/flaky HTTP/1.1\r\nHost: router.test\r\nContent-Length: 1\r\n\r\nx"
        ))
        .await;
        let a = c.answer().await;
        let sent = node.seen().iter().filter(|s| s.starts_with(method)).count();
        if retried {
            assert_eq!(
                (a.status(), a.body.as_slice()),
                (200, &b"retry"[..]),
                "{a:?}"
            );
            assert_eq!(sent, 3, "the first GET, then the second one twice");
        } else {
            assert_eq!(a.status(), 502, "{a:?}");
            assert_eq!(sent, 1, "a POST reaches the node once");
        }
        r.stop().await;
    }
}

#[tokio::test]
async fn an_upgrade_request_with_a_body_is_refused_and_never_reaches_the_node() {
    let (r, node, mut c) =
        cluster(vec!["HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"]).await;
    c.send(concat!(
        "GET /rooms/a HTTP/1.1\r\nHost: router.test\r\nConnection: Upgrade\r\n",
        "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "Sec-WebSocket-Version: 13\r\nContent-Length: 5\r\n\r\nhello",
    ))
    .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 400, "{a:?}");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["error"], "invalid_request");
    assert!(node.seen().is_empty(), "{:?}", node.seen());
    assert_eq!(
        metric(&r, "roomrouter_proxy_nodes_marked_unhealthy_total").await,
        0
    );
    // A refused request changes nothing: the room is not placed, no join is counted, and
    // the connection has joined nothing.
    assert_not_placed(&r, "a").await;
    let n1 = admin_json(&r, "/v1/nodes/n1").await;
    assert_eq!(n1["pending"], 0.0, "{n1}");
    assert_eq!(n1["reserved"], 0.0, "{n1}");
}

/// A request body in a transfer coding besides chunked (`gzip, chunked`): hyper takes the
/// chunks off and leaves the gzip, which forwarded chunked the node would read as the body
/// itself. Refused before the room is placed, and never sent to the node.
#[tokio::test]
async fn a_request_body_coded_besides_chunked_is_refused_and_never_reaches_the_node() {
    let (r, node, mut c) = cluster(vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
    c.send(concat!(
        "POST /rooms/coded HTTP/1.1\r\nHost: router.test\r\n",
        "Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ))
    .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 400, "{a:?}");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["error"], "invalid_request");
    assert!(node.seen().is_empty(), "{:?}", node.seen());
    assert_not_placed(&r, "coded").await;
    r.stop().await;
}

/// A node answers a chunked upload (which hyper carries) before it has the whole body, and
/// keeps its connection open. The node connection is still sending the body: put back in
/// the pool, nobody drove it, and the client's upload and its next request hung until the
/// pool's reaper dropped the connection (every 30 s at the default idle timeout). Now the
/// node connection closes with the answer, and the client's connection, whose unread body
/// is still on it, ends too: the client is never left hanging.
#[tokio::test]
async fn an_early_answer_to_an_upload_does_not_leave_the_client_hanging() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Bounded: a few connections, each read for at most 10 s; aborted at the end.
    let node = tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while find(&buf, b"\r\n\r\n").is_none() {
                    if read_some(&mut sock, &mut buf).await.is_none() {
                        return;
                    }
                }
                let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if sock.write_all(ok.as_bytes()).await.is_err() {
                    return;
                }
                let mut rest = [0u8; 4096];
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                while let Ok(Ok(n)) = tokio::time::timeout_at(until, sock.read(&mut rest)).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    let r = TestRouter::start(proxy_config()).await;
    let body = serde_json::json!({"url": url, "capacity": 100, "load": 0});
    assert_eq!(heartbeat(&r, "n1", body).await.status(), 200);
    let mut c = Raw::connect(&r).await;
    c.send(concat!(
        "POST /rooms/early HTTP/1.1\r\nHost: router.test\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ))
    .await;
    let a = c.answer().await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.body, b"ok");
    // The rest of the upload, then another request on the same connection: it is answered,
    // or the connection ends, but it is not left hanging.
    let _ = c
        .sock
        .write_all(b"5\r\nworld\r\n0\r\n\r\nGET /rooms/early HTTP/1.1\r\nHost: router.test\r\n\r\n")
        .await;
    let mut chunk = [0u8; 4096];
    let next = tokio::time::timeout(Duration::from_secs(5), c.sock.read(&mut chunk)).await;
    assert!(
        next.is_ok(),
        "the client's connection hung after an early answer"
    );
    r.stop().await;
    node.abort();
}

/// A node that answers every request `answer` as soon as it has the head, then reads
/// nothing more for 30 s (bounded: a few connections; aborted at the end), as a media server
/// refusing an upload (too big, not allowed) may.
async fn answering_early(answer: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while find(&buf, b"\r\n\r\n").is_none() {
                    if read_some(&mut sock, &mut buf).await.is_none() {
                        return;
                    }
                }
                let _ = sock.write_all(answer.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    (url, task)
}

/// A node answers a large upload before its end (a `413`, with a `103` before it) and
/// stops reading. The answer reaches the client at once, on both paths, rather than once
/// the upload is cut by `proxy.idle_timeout` (the fast path sent the whole body before it
/// looked for an answer); the client connection, its body half read, then closes. And a
/// client that stops sending its body after the node answered gets the node's answer, not
/// the router's `408` at `proxy.idle_timeout`.
#[tokio::test]
async fn a_node_answering_an_upload_before_its_end_is_heard_at_once() {
    const ANSWER: &str = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                          HTTP/1.1 413 Too Big\r\nContent-Length: 4\r\n\r\nnope";
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        cfg.proxy.idle_timeout = Duration::from_secs(30);
        cfg.proxy.max_request_body_bytes = 1 << 30;
        let (url, node) = answering_early(ANSWER).await;
        let r = TestRouter::start(cfg).await;
        let body = serde_json::json!({"url": url, "capacity": 100, "load": 0});
        assert_eq!(heartbeat(&r, "n1", body).await.status(), 200);

        // 1. An upload far larger than the socket buffers between here and the node.
        let total: usize = 64 << 20;
        let c = Raw::connect(&r).await;
        let (mut rd, mut wr) = c.sock.into_split();
        let upload = tokio::spawn(async move {
            let head = format!(
                "POST /rooms/a HTTP/1.1\r\nHost: router.test\r\nContent-Length: {total}\r\n\r\n"
            );
            wr.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'a'; 64 << 10];
            for _ in 0..total / chunk.len() {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let heard = tokio::time::timeout(Duration::from_secs(10), async {
            let mut b = [0u8; 4096];
            while find(&got, b"nope").is_none() {
                match rd.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&b[..n]),
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            heard.is_ok() && text.starts_with("HTTP/1.1 413") && text.ends_with("nope"),
            "fast path {fast_path}: the node's answer was held back: {text:?}"
        );
        assert!(
            !text.contains("103"),
            "fast path {fast_path}: interim answers are not relayed: {text:?}"
        );
        upload.abort();

        // 2. A client that stops sending its body once the node has answered.
        let mut c = Raw::connect(&r).await;
        c.send(
            "POST /rooms/b HTTP/1.1\r\nHost: router.test\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .await;
        let a = tokio::time::timeout(Duration::from_secs(10), c.answer()).await;
        let a = a
            .unwrap_or_else(|_| panic!("fast path {fast_path}: no answer before the idle timeout"));
        assert_eq!(a.status(), 413, "fast path {fast_path}: {a:?}");
        assert!(
            c.closed().await,
            "fast path {fast_path}: the body is still on the connection"
        );
        r.stop().await;
        node.abort();
    }
}

/// A node that takes connections and closes each on reading a request, answering nothing
/// (a wedged process whose heartbeat still goes out): with no body of the client's in play
/// that is the node's failure, on both paths, and `proxy.failures_to_unhealthy` of them mark
/// it unhealthy. Before, such exchanges were never counted, and every join got a `502`
/// while the node stayed in use.
#[tokio::test]
async fn a_node_that_closes_before_answering_bodiless_requests_is_marked_unhealthy() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        cfg.proxy.failures_to_unhealthy = 2;
        // An empty script line: the node answers nothing and closes.
        let (r, node, mut c) = cluster_with(cfg, vec![""]).await;
        for i in 0..2 {
            c.send(&get("/rooms/wedged")).await;
            let a = c.answer().await;
            assert_eq!(a.status(), 502, "fast path {fast_path}, request {i}: {a:?}");
        }
        assert!(!node.seen().is_empty());
        assert_eq!(
            metric(&r, "roomrouter_proxy_nodes_marked_unhealthy_total").await,
            1,
            "fast path {fast_path}"
        );
        r.stop().await;
    }
}

#[tokio::test]
async fn a_node_answer_whose_body_is_malformed_from_the_start_gets_the_client_a_502() {
    let (r, _node, mut c) = cluster(vec![
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ])
    .await;
    c.send(&get("/rooms/a")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 502, "{a:?}");
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["error"], "upstream_unavailable");
    assert_eq!(fast_requests(&r).await, 1);
}

#[tokio::test]
async fn a_chunk_extension_with_a_control_byte_is_not_relayed() {
    // A NUL in a chunk extension: a client's parser may end the line (or the message) there,
    // and the relay would no longer agree with it on where the next answer starts.
    let (r, _node, mut c) = cluster(vec![
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=\0\r\nhello\r\n0\r\n\r\n",
    ])
    .await;
    c.send(&get("/rooms/a")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 502, "{a:?}");
    assert!(!a.body.windows(5).any(|w| w == b"hello"), "{a:?}");
    assert_eq!(fast_requests(&r).await, 1);
}

/// A node that answers an upload early, with a body malformed from the start, and resets
/// the connection: the router's next write of the body fails. The client gets a 502 and
/// its connection closes, because the rest of its body is still on it: read as the next
/// request, the body's bytes would be forwarded as one (a smuggled request).
#[tokio::test]
async fn an_early_malformed_answer_to_an_upload_closes_the_client_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    // Bounded: a few connections, each read for at most 5 s; aborted at the end.
    let node = tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut got = Vec::new();
            while find(&got, b"\r\n\r\n").is_none_or(|i| got.len() < i + 4 + 10) {
                if read_some(&mut sock, &mut got).await.is_none() {
                    break;
                }
            }
            s.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&got).to_string());
            let answer = b"HTTP/1.1 413 Too Big\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
            let _ = sock.write_all(answer).await;
            sock.set_zero_linger().unwrap();
        }
    });
    let r = TestRouter::start(proxy_config()).await;
    let body = serde_json::json!({"url": url, "capacity": 100, "load": 0});
    assert_eq!(heartbeat(&r, "n1", body).await.status(), 200);
    let mut c = Raw::connect(&r).await;
    c.send("POST /rooms/a HTTP/1.1\r\nHost: router.test\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(&get("/rooms/smuggled")).await;
    let a = c.answer().await;
    assert_eq!(a.status(), 502, "{a:?}");
    assert!(
        c.closed().await,
        "the connection stays open with a body half-read"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|req| !req.contains("/rooms/smuggled")),
        "the body reached the node as a request: {seen:?}"
    );
    node.abort();
}

#[tokio::test]
async fn an_upload_slower_than_the_response_timeout_is_answered_through_hyper_too() {
    // The node's answer is due `response_timeout` after it has the whole request, not after
    // the request began: an upload that keeps flowing may take longer.
    let mut cfg = proxy_config();
    cfg.server.fast_path = false;
    cfg.proxy.response_timeout = Duration::from_millis(500);
    let (r, node, mut c) =
        cluster_with(cfg, vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
    c.send("POST /rooms/a HTTP/1.1\r\nHost: router.test\r\nContent-Length: 8\r\n\r\n")
        .await;
    for byte in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send(byte).await;
    }
    let a = c.answer().await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.body, b"ok");
    assert!(node.seen()[0].ends_with("abcdefgh"), "{:?}", node.seen());
    assert_eq!(fast_requests(&r).await, 0, "hyper carried it");
}

/// An upload the router refuses before reading it (a `413`: its `Content-Length` is over
/// `proxy.max_request_body_bytes`) while the client is still sending it, on the fast path
/// and on hyper's: the answer goes out and the close lingers, reading what the client
/// sends, so that the client's writes go on without a reset and it reads the answer whole.
/// Closed at once, the socket's unread bytes made Linux reset the connection, and a client
/// still writing got `ECONNRESET` (or `EPIPE`), which many report instead of the answer.
/// The client pauses between its first part and the rest until it has the answer, so that
/// no bytes wait unread when the router closes: the close must linger all the same (hyper's
/// path once lingered only over bytes waiting at that instant, and a client whose next
/// write came a moment later met a reset).
#[tokio::test]
async fn a_refused_upload_still_being_sent_gets_its_answer_and_no_reset() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        cfg.proxy.max_request_body_bytes = 1 << 20;
        let (r, _node, c) =
            cluster_with(cfg, vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        let sent = upload_after_its_answer(c, "HTTP/1.1 413", "payload_too_large").await;
        assert_eq!(
            sent,
            Ok(()),
            "fast path {fast_path}: the client's writes met a reset"
        );
        r.stop().await;
    }
}

/// A socket that lingers after hyper closed it still holds its slot under
/// `server.max_connections`: lingering sockets, slot-free, grew with the accept rate (2 s
/// of accepts, in descriptors and buffers) whatever the limit said. With one slot, a
/// second client waits while the first one's closed connection lingers, and is served once
/// that client closes.
#[tokio::test]
async fn a_lingering_socket_keeps_its_connection_slot() {
    let mut cfg = config();
    cfg.server.max_connections = 1;
    let r = TestRouter::start(cfg).await;
    let ask = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut first = TcpStream::connect(r.addr).await.unwrap();
    first.write_all(ask.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut answer))
        .await
        .expect("the router closes its side after the answer")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    // The first client keeps its side open: the router's socket lingers over it.
    let mut second = TcpStream::connect(r.addr).await.unwrap();
    second.write_all(ask.as_bytes()).await.unwrap();
    let mut b = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut b)).await;
    assert!(
        early.is_err(),
        "served while the first socket lingered: {early:?}"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut b))
        .await
        .expect("served once the first client closed")
        .unwrap();
    assert!(b[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &b[..n]);
    r.stop().await;
}

/// As [`a_refused_upload_still_being_sent_gets_its_answer_and_no_reset`], when the refusal
/// is the node's: it answers `413` once it has the head and reads no more. The router
/// relays the answer and closes the client connection, whose body is half read: that close
/// lingers too (the fast path closed at once, and the client still uploading met a reset).
#[tokio::test]
async fn a_nodes_early_answer_to_an_upload_still_being_sent_comes_with_no_reset() {
    const ANSWER: &str = "HTTP/1.1 413 Too Big\r\nContent-Length: 4\r\n\r\nnope";
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.server.fast_path = fast_path;
        cfg.proxy.max_request_body_bytes = 1 << 30;
        let (url, node) = answering_early(ANSWER).await;
        let r = TestRouter::start(cfg).await;
        let body = serde_json::json!({"url": url, "capacity": 100, "load": 0});
        assert_eq!(heartbeat(&r, "n1", body).await.status(), 200);
        let c = Raw::connect(&r).await;
        let sent = upload_after_its_answer(c, "HTTP/1.1 413 Too Big", "nope").await;
        assert_eq!(
            sent,
            Ok(()),
            "fast path {fast_path}: the client's writes met a reset"
        );
        r.stop().await;
        node.abort();
    }
}

/// As [`a_refused_upload_still_being_sent_gets_its_answer_and_no_reset`], for a redirect:
/// a `GET` with a body in redirect mode gets its `307` and the connection closes over the
/// unread body, lingering (the fast path closed at once, and the client met a reset).
#[tokio::test]
async fn a_redirect_over_a_body_still_being_sent_comes_with_no_reset() {
    for fast_path in [true, false] {
        let mut cfg = proxy_config();
        cfg.front_door.mode = FrontDoorMode::Redirect;
        cfg.server.fast_path = fast_path;
        let (r, _node, c) =
            cluster_with(cfg, vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        let sent = upload_after_its_answer_as(c, "GET", "HTTP/1.1 307", "\r\n\r\n").await;
        assert_eq!(
            sent,
            Ok(()),
            "fast path {fast_path}: the client's writes met a reset"
        );
        r.stop().await;
    }
}

/// Sends `POST /rooms/a` with a 64 MiB `Content-Length` on `c`: the head and 1 KiB, then,
/// once the answer (starting `status`, holding `marker`) has been read and 50 ms more, about
/// 3 MiB paced over 0.5 s (bounded; well within the linger's 2 s, on a busy machine too).
/// The pause leaves no bytes unread when the router closes,
/// so a close that lingers only over bytes waiting at that instant is caught. `Err` names
/// the write that failed (a reset).
async fn upload_after_its_answer(c: Raw, status: &str, marker: &str) -> Result<(), String> {
    upload_after_its_answer_as(c, "POST", status, marker).await
}

/// [`upload_after_its_answer`] with the request's `method`.
async fn upload_after_its_answer_as(
    c: Raw,
    method: &str,
    status: &str,
    marker: &str,
) -> Result<(), String> {
    let (mut rd, mut wr) = c.sock.into_split();
    let (answered, heard_answer) = tokio::sync::oneshot::channel::<()>();
    let head = format!(
        "{method} /rooms/a HTTP/1.1\r\nHost: router.test\r\nContent-Length: 67108864\r\n\r\n"
    );
    let upload = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(&[b'a'; 1024]).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), heard_answer).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let chunk = vec![b'a'; 64 << 10];
        let started = tokio::time::Instant::now();
        for i in 0..50 {
            if let Err(e) = wr.write_all(&chunk).await {
                return Err(format!(
                    "write {i} failed after {:?}: {e}",
                    started.elapsed()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    });
    let mut got = Vec::new();
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        let mut b = [0u8; 4096];
        while find(&got, marker.as_bytes()).is_none() {
            match rd.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
    })
    .await;
    let _ = answered.send(());
    let text = String::from_utf8_lossy(&got);
    assert!(
        heard.is_ok() && text.starts_with(status) && text.contains(marker),
        "the answer: {text:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), upload)
        .await
        .expect("the upload is bounded")
        .unwrap()
}
