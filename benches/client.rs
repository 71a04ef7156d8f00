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
    let bodies: Vec<(String, serde_json::Value)> = (0..n)
        .map(|i| {
            (
                format!("{i:064x}"),
                json!({"model": "m", "messages": [{"role": "user", "content": format!("{i} {prompt}")}],
                       "max_tokens": 8, "stream": false}),
            )
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (c0, t0) = (thread_cpu(), Instant::now());
    rt.block_on(async {
        let mut s = futures_util::stream::iter(bodies.iter())
            .map(|(k, b)| {
                let client = &client;
                async move { (k, client.chat(k, b, 0).await) }
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
    });
    let (wall, cpu) = (
        t0.elapsed().as_secs_f64(),
        (thread_cpu() - c0).as_secs_f64(),
    );
    (n as f64 / wall, cpu / n as f64 * 1000.0)
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
}
