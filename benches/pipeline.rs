//! Throughput of the native path alone: socket -> read loop -> job queue -> workers (decode and
//! a trivial processor) -> result queue -> `next_batch(1024, ..)`; for bytes also with no
//! worker (socket -> read loop -> job queue -> `next_batch`), the path of `decode="bytes"`
//! without a handler.
//!
//! A local server, started once outside the timed part, answers each connection with the same
//! pre-encoded frames: N unmasked text frames of ~120-byte JSON messages, then a close frame,
//! written straight to the TCP stream after tokio-tungstenite's handshake. Each iteration opens
//! a stream, pulls every result and waits for the end, so connect and handshake are included
//! (well under a millisecond on loopback).
//!
//! Run: `cargo bench --bench pipeline` (about 30 s once built), or add `-- --quick`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wspool::{Batch, Config, Data, DecodeError, DecodeMode, Error, Job, Node, Processor, Stream};

/// Messages per stream.
const N: u64 = 100_000;
/// Size every message is padded to (fits the 2-byte frame header: <= 125).
const MESSAGE_SIZE: usize = 120;

/// A close frame, code 1000, no reason.
const CLOSE_FRAME: [u8; 4] = [0x88, 0x02, 0x03, 0xE8];

fn message(seq: u64) -> Vec<u8> {
    let head = format!(
        "{{\"seq\":{seq},\"sym\":\"BTC-USD\",\"side\":\"buy\",\"px\":64123.5,\"qty\":0.125,\
         \"ts\":1700000000123,\"pad\":\""
    );
    let pad = MESSAGE_SIZE.saturating_sub(head.len() + 2);
    let mut m = head.into_bytes();
    m.resize(m.len() + pad, b'x');
    m.extend_from_slice(b"\"}");
    m
}

/// N text frames as a server sends them: FIN + opcode 1, unmasked, 7-bit length.
fn frames() -> Vec<u8> {
    let mut out = Vec::with_capacity((N as usize) * (MESSAGE_SIZE + 2) + CLOSE_FRAME.len());
    for seq in 0..N {
        let m = message(seq);
        let len = u8::try_from(m.len()).expect("message length");
        assert!(len <= 125, "message {seq} needs a longer header");
        out.extend_from_slice(&[0x81, len]);
        out.extend_from_slice(&m);
    }
    out.extend_from_slice(&CLOSE_FRAME);
    out
}

/// Starts the server on its own thread and runtime; returns its URL. It serves every connection
/// with `payload` and lives as long as the bench process.
fn start_server(payload: Arc<Vec<u8>>) -> String {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("server runtime");
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let port = listener.local_addr().expect("address").port();
                port_tx.send(port).expect("send the port");
                while let Ok((tcp, _)) = listener.accept().await {
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                            return;
                        };
                        let mut tcp = ws.into_inner();
                        // One write of the whole buffer: the kernel takes it as the client reads.
                        if tcp.write_all(&payload).await.is_err() {
                            return;
                        }
                        // Wait (bounded) for the client's close reply, the only thing it sends,
                        // then drop the connection: the server closes TCP first (RFC 6455), and
                        // the client waits for that before its read loop ends.
                        let mut buf = [0u8; 256];
                        let _ =
                            tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
                    });
                }
            });
        })
        .expect("spawn the server thread");
    let port = port_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the server did not start");
    format!("ws://127.0.0.1:{port}/")
}

/// Returns the `seq` field of a JSON message, or the job id when not decoding JSON.
struct Seq;

impl Processor for Seq {
    type Output = u64;

    fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (u64, bool) {
        match decoded {
            Ok(Data::Json(doc)) => match doc.path(["seq"]).map(|i| doc.nodes()[i]) {
                Some(Node::Int(seq)) => (seq as u64, true),
                _ => (u64::MAX, false),
            },
            Ok(_) => (job.id, true),
            Err(_) => (u64::MAX, false),
        }
    }

    fn panicked(&self, _job: Job, _error: Error) -> u64 {
        u64::MAX
    }
}

/// [`Seq`] for bytes, declared to have nothing to run ([`Processor::passthrough`]): with one
/// worker the stream starts none and `next_batch` takes the jobs from the queue itself, as
/// wspool's Python layer does for `decode="bytes"` without a handler.
struct Direct;

impl Processor for Direct {
    type Output = u64;

    fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (u64, bool) {
        Seq.process(job, decoded)
    }

    fn panicked(&self, _job: Job, _error: Error) -> u64 {
        u64::MAX
    }

    fn passthrough(&self, mode: DecodeMode) -> Option<fn(Job) -> u64> {
        (mode == DecodeMode::Bytes).then_some(|job| job.id)
    }
}

/// One stream from start to end; returns how long it took and checks every result.
fn run(url: &str, decode: DecodeMode, workers: usize, direct: bool) -> Duration {
    let mut config = Config::new(url);
    config.decode = decode;
    config.workers = workers;
    let started = Instant::now();
    let stream = if direct {
        Stream::start(config, Direct)
    } else {
        Stream::start(config, Seq)
    }
    .expect("start");
    let (mut count, mut sum) = (0u64, 0u64);
    loop {
        match stream.next_batch(1024, Duration::from_secs(1)) {
            Batch::Items(items) => {
                count += items.len() as u64;
                sum = items.iter().fold(sum, |s, &v| s.wrapping_add(v));
            }
            Batch::Pending => assert!(
                started.elapsed() < Duration::from_secs(60),
                "stuck after {count} results"
            ),
            Batch::End(end) => {
                assert_eq!(end, None);
                break;
            }
        }
    }
    let took = started.elapsed();
    assert_eq!(count, N);
    assert_eq!(sum, N * (N - 1) / 2, "every seq exactly once");
    assert!(stream.join(Duration::from_secs(5)), "threads still running");
    took
}

fn pipeline(c: &mut Criterion) {
    let url = start_server(Arc::new(frames()));
    let mut summary = Vec::new();
    for (name, decode) in [("count", DecodeMode::Bytes), ("json", DecodeMode::Json)] {
        let mut group = c.benchmark_group(name);
        group
            .throughput(Throughput::Elements(N))
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        // Bytes also without a worker: the consumer takes the jobs itself.
        for (workers, direct) in [(1usize, false), (2, false), (1, true)] {
            if direct && decode != DecodeMode::Bytes {
                continue;
            }
            let id = if direct {
                BenchmarkId::new("no worker", 0)
            } else {
                BenchmarkId::new("workers", workers)
            };
            // Every timed run, warm-up included, for the messages/s summary below.
            let tally = Mutex::new((0u64, Duration::ZERO));
            group.bench_with_input(id, &workers, |b, &workers| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += run(&url, decode, workers, direct);
                    }
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    t.0 += iters * N;
                    t.1 += total;
                    total
                })
            });
            let (messages, time) = *tally.lock().unwrap_or_else(|e| e.into_inner());
            summary.push((name, workers, direct, messages as f64 / time.as_secs_f64()));
        }
        group.finish();
    }
    println!("\nmessages/s (mean over every timed run, {N} messages of {MESSAGE_SIZE} B each):");
    for (name, workers, direct, rate) in summary {
        if direct {
            println!("  {name:>5}, no worker:   {rate:>12.0} msg/s total");
        } else {
            println!(
                "  {name:>5}, {workers} worker(s): {rate:>12.0} msg/s total, {:>12.0} msg/s per worker",
                rate / workers as f64
            );
        }
    }
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
