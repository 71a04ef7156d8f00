//! Client throughput: kvt's OpenAI-compatible client against a fast local stub
//! (axum, in this process on its own runtime and threads), concurrency 64,
//! ~2 KB prompts, with and without the request journal. Prints requests per
//! second and the client thread's CPU time per 1,000 requests.
//! Run: `cargo bench --bench client`. Figures go in benches/README.md.

use futures_util::StreamExt;
use kvt::llm::client::{Client, ClientOptions};
use kvt::llm::journal::Journal;
use serde_json::json;
use std::time::{Duration, Instant};

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `work` (`n` requests) on a current-thread runtime: requests per
/// second, and this thread's CPU seconds per 1,000 requests.
fn on_one_thread(n: usize, work: impl std::future::Future<Output = ()>) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (c0, t0) = (thread_cpu(), Instant::now());
    rt.block_on(work);
    let (wall, cpu) = (
        t0.elapsed().as_secs_f64(),
        (thread_cpu() - c0).as_secs_f64(),
    );
    (n as f64 / wall, cpu / n as f64 * 1000.0)
}

fn stub() -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = format!("http://{}/v1", listener.local_addr().unwrap());
    let body = json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 500, "completion_tokens": 1}
    })
    .to_string();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |_b: axum::body::Bytes| {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rt)
}

fn run(addr: &str, n: usize, mut journal: Option<&mut Journal>) -> (f64, f64) {
    let client = Client::new(ClientOptions {
        base_urls: vec![addr.to_string()],
        api_key: None,
        timeout: Duration::from_secs(30),
        max_retries: 2,
        stream: false,
        backoff: Duration::from_millis(10),
        limits: kvt::llm::limits::Limits {
            concurrency: 64,
            ..Default::default()
        },
        api: kvt::config::schema::Api::Chat,
        max_response_bytes: 64 << 20,
    })
    .unwrap();
    let prompt = "The ferry crossed the estuary twice an hour. ".repeat(45); // ~2 KB
    let bodies: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            (
                format!("{i:064x}"),
                serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "user", "content": format!("{i} {prompt}")}],
                       "max_tokens": 8, "stream": false})).unwrap(),
            )
        })
        .collect();
    on_one_thread(n, async {
        let mut s = futures_util::stream::iter(bodies.iter())
            .map(|(k, b)| {
                let client = &client;
                async move { (k, client.chat(k, b.clone(), 8, 0).await) }
            })
            .buffer_unordered(64);
        let mut ok = 0;
        while let Some((k, o)) = s.next().await {
            if let Some(j) = journal.as_mut() {
                j.record(k, &o).unwrap();
            }
            ok += o.is_final as usize;
        }
        assert_eq!(ok, n);
        if let Some(j) = journal.as_mut() {
            j.flush().unwrap();
        }
    })
}

/// The floor under any client: 64 keep-alive connections on one thread,
/// each writing a prepared HTTP/1.1 request and reading the response by its
/// Content-Length, nothing else (no JSON, no pool, no timeouts).
fn raw_floor(addr: &str, n: usize) -> (f64, f64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = addr
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let prompt = "The ferry crossed the estuary twice an hour. ".repeat(45);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": 8, "stream": false})
    .to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // 64 connections, n / 64 requests each.
    on_one_thread(n / 64 * 64, async {
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (hostport, req) = (hostport.clone(), req.clone());
                async move {
                    let mut s = tokio::net::TcpStream::connect(&hostport).await.unwrap();
                    s.set_nodelay(true).unwrap();
                    let mut buf = vec![0u8; 16 << 10];
                    for _ in 0..n / 64 {
                        s.write_all(req.as_bytes()).await.unwrap();
                        let mut have = 0;
                        loop {
                            have += s.read(&mut buf[have..]).await.unwrap();
                            let text = &buf[..have];
                            if let Some(h) = text.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = std::str::from_utf8(&text[..h])
                                    .unwrap()
                                    .to_ascii_lowercase();
                                let len: usize = head
                                    .split("content-length:")
                                    .nth(1)
                                    .and_then(|r| r.lines().next())
                                    .and_then(|v| v.trim().parse().ok())
                                    .unwrap();
                                if have >= h + 4 + len {
                                    break;
                                }
                            }
                        }
                    }
                }
            })
            .collect();
        futures_util::future::join_all(tasks).await;
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (addr, _rt) = stub();
    run(&addr, 2000, None); // warm up connections
    let n = 20_000;
    let (rps, cpu) = run(&addr, n, None);
    println!("client only:          {rps:>8.0} requests/s, {cpu:.3} client CPU-s per 1,000 requests ({n} requests, concurrency 64)");
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&dir.path().join("journal.sqlite")).unwrap();
    let (rps, cpu) = run(&addr, n, Some(&mut j));
    println!("client + journal:     {rps:>8.0} requests/s, {cpu:.3} client CPU-s per 1,000 requests ({n} requests, concurrency 64)");
    let (rps, cpu) = raw_floor(&addr, n);
    println!("raw HTTP/1.1 floor:   {rps:>8.0} requests/s, {cpu:.3} client CPU-s per 1,000 requests ({n} requests, concurrency 64)");
}
