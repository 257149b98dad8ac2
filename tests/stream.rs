//! Integration tests of `wspool::Stream` against small WebSocket servers written here with the
//! server side of tokio-tungstenite (or raw TCP), each on 127.0.0.1 on its own runtime and thread.

mod common;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use wspool::{Batch, Data, DecodeMode, Error, Json, Kind, Outgoing, Stream, Subscribe};

use common::*;

#[test]
fn every_message_gives_one_result_then_a_clean_end() {
    const N: u64 = 5000;
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..N).await.expect("send");
        close_with(&mut ws, 1000, "bye").await
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Json, 4, 64),
        Recorder::default(),
    )
    .expect("start");
    connected(&stream);
    let (mut results, end) = collect(&stream, Duration::from_secs(10));
    assert_eq!(end, None);
    assert_eq!(results.len() as u64, N);
    results.sort_by_key(|r| r.id);
    for (i, r) in (0..N).zip(&results) {
        assert_eq!(r.id, i);
        assert_eq!((r.kind, r.connection), (Kind::Text, 0));
        let expected = json!({"seq": i, "text": format!("m{i}")});
        let doc = Json::from_value(&expected).expect("json");
        assert_eq!(r.data, Ok(Data::Json(doc)), "message {i}");
    }
    let s = stream.stats();
    assert_eq!(
        (s.received, s.processed, s.failed, s.cancelled, s.in_flight),
        (N, N, 0, 0, 0)
    );
    let bytes: usize = (0..N).map(|i| text_payload(i).len()).sum();
    assert_eq!(s.bytes, bytes as u64);
    joined(&stream);
    // The client answered our close frame (echoing its code).
    assert_eq!(server.finish(), Some(1000));
}

#[test]
fn close_code_from_the_server_ends_with_an_error() {
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..10).await.expect("send");
        close_with(&mut ws, 1011, "boom").await
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 2, 16),
        Recorder::default(),
    )
    .expect("start");
    let (results, end) = collect(&stream, Duration::from_secs(5));
    assert_eq!(results.len(), 10);
    assert_eq!(
        end,
        Some(Error::Closed {
            code: 1011,
            reason: "boom".into()
        })
    );
    let s = stream.stats();
    assert_eq!((s.received, s.processed, s.in_flight), (10, 10, 0));
    joined(&stream);
    assert_eq!(server.finish(), Some(1011));
}

#[test]
fn a_dropped_connection_ends_with_1006_after_every_result() {
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..10).await.expect("send");
        // No close frame: the TCP connection just goes.
        drop(ws);
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Json, 2, 16),
        Recorder::default(),
    )
    .expect("start");
    let (mut results, end) = collect(&stream, Duration::from_secs(5));
    results.sort_by_key(|r| r.id);
    assert_eq!(
        results.iter().map(|r| r.id).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    match end {
        Some(Error::Closed { code: 1006, reason }) => assert!(!reason.is_empty()),
        other => panic!("expected Closed 1006, got {other:?}"),
    }
    joined(&stream);
    server.finish();
}

#[test]
fn a_refused_connection_names_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    // The listener is gone: nothing listens on `port` any more.
    let url = format!("ws://127.0.0.1:{port}/feed");
    let stream =
        Stream::start(config(&url, DecodeMode::Text, 1, 4), Recorder::default()).expect("start");
    let e = connect_error(&stream);
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains(&url), "{e}");
    // The error stays available, and the stream ends with it.
    assert_eq!(
        stream.wait_connected(Duration::from_secs(1)),
        Some(Err(e.clone()))
    );
    let (results, end) = collect(&stream, Duration::from_secs(3));
    assert!(results.is_empty());
    assert_eq!(end, Some(e));
    joined(&stream);
}

#[test]
fn a_refused_upgrade_gives_the_http_status() {
    let server = serve_tcp(|mut tcp| async move {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16_384 {
            let n = tcp.read(&mut buf).await.expect("read the request");
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\
              Content-Length: 13\r\nConnection: close\r\n\r\nno entry here",
        )
        .await
        .expect("write the response");
        tcp.shutdown().await.expect("shutdown");
        // Wait (bounded by SERVER_LIMIT) for the client to go.
        while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        String::from_utf8_lossy(&request).into_owned()
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 1, 4),
        Recorder::default(),
    )
    .expect("start");
    match connect_error(&stream) {
        Error::Handshake { url, status, body } => {
            assert_eq!(status, 403);
            assert_eq!(url, server.url());
            // The body is reported when it came with the head (it does here).
            assert!(body.is_empty() || body == "no entry here", "{body:?}");
        }
        other => panic!("expected a handshake error, got {other:?}"),
    }
    joined(&stream);
    let request = server.finish().to_ascii_lowercase();
    assert!(request.starts_with("get / http/1.1\r\n"), "{request}");
    assert!(request.contains("upgrade: websocket"), "{request}");
}

#[test]
fn a_silent_server_times_out_within_open_timeout() {
    let server = serve_tcp(|mut tcp| async move {
        // Never answer; wait (bounded by SERVER_LIMIT) for the client to give up.
        let mut buf = [0u8; 1024];
        while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 1, 4);
    cfg.open_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let stream = Stream::start(cfg, Recorder::default()).expect("start");
    let e = connect_error(&stream);
    let took = started.elapsed();
    match &e {
        Error::Timeout { url, after } => {
            assert_eq!(url, &server.url());
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert!(e.to_string().contains("timed out after 0.3 s"), "{e}");
    joined(&stream);
    server.finish();
}

#[test]
fn subscribe_messages_and_headers_arrive_first_and_in_order() {
    let server = serve_tcp(|tcp| async move {
        let mut token = None;
        // The signature is tungstenite's `Callback`; its error type is not ours to shrink.
        #[allow(clippy::result_large_err)]
        let callback = |request: &Request, response: Response| {
            token = request
                .headers()
                .get("x-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok(response)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
            .await
            .expect("handshake");
        let mut first = Vec::new();
        while first.len() < 3 {
            let next = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
            match next {
                Ok(Some(Ok(msg))) => first.push(msg),
                other => panic!("expected a subscribe message, got {other:?}"),
            }
        }
        send_texts(&mut ws, 0..1).await.expect("send");
        close_with(&mut ws, 1000, "").await;
        (token, first)
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 1, 4);
    cfg.headers = vec![("X-Token".into(), "secret".into())];
    cfg.subscribe = Subscribe::Messages(vec![
        Outgoing::Text("sub:a".into()),
        Outgoing::Binary(vec![0, 1, 2, 255]),
        Outgoing::Text("sub:b".into()),
    ]);
    let stream = Stream::start(cfg, Recorder::default()).expect("start");
    connected(&stream);
    let (results, end) = collect(&stream, Duration::from_secs(5));
    assert_eq!(end, None);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].data, Ok(Data::Text(text_payload(0))));
    joined(&stream);
    let (token, first) = server.finish();
    assert_eq!(token.as_deref(), Some("secret"));
    assert_eq!(
        first,
        vec![
            Message::text("sub:a"),
            Message::binary(vec![0u8, 1, 2, 255]),
            Message::text("sub:b"),
        ]
    );
}

/// Pulls nothing for 200 ms, sampling `received` every 20 ms; checks that no more than `bound`
/// messages were read and that reading had stopped (the last samples agree). Returns the most.
fn read_while_paused<O: Send + 'static>(stream: &Stream<O>, bound: u64) -> u64 {
    let pause = Instant::now();
    let mut samples = Vec::new();
    while pause.elapsed() < Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(20));
        samples.push(stream.stats().received);
    }
    let most = samples.iter().copied().max().unwrap_or(0);
    assert!(
        most <= bound,
        "read {most} > {bound} while paused: {samples:?}"
    );
    let tail = &samples[samples.len() - 3..];
    assert!(tail.iter().all(|&r| r == tail[0]), "{samples:?}");
    most
}

#[test]
fn a_slow_consumer_stops_the_reading() {
    const N: u64 = 20_000;
    const QUEUE: usize = 8;
    const WORKERS: usize = 1;
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..N).await.expect("send");
        close_with(&mut ws, 1000, "").await
    });
    let processor = Recorder::sleeping(Duration::from_millis(1));
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, WORKERS, QUEUE),
        processor.clone(),
    )
    .expect("start");
    connected(&stream);
    // Pull nothing for 200 ms: the result queue fills, then the job queue, then reading stops
    // (and TCP pushes back on the server). Read by then, at most: the result queue (QUEUE
    // results when the worker hands them over one by one, as with a slow job), the job queue
    // (QUEUE, one more at a stop), the read loop's run (never more than the queue holds) and
    // one job in each worker's hand.
    let bound = (QUEUE * 3 + WORKERS + 1) as u64;
    let most = read_while_paused(&stream, bound);
    assert!(most > 0, "nothing was read");
    // 20,000 jobs at 1 ms each would take 20 s: drop the per-job sleep, then pull everything.
    processor.set_delay(Duration::ZERO);
    let (results, end) = collect(&stream, Duration::from_secs(10));
    assert_eq!(end, None);
    // One worker: results come in receipt order.
    assert!(results.iter().map(|r| r.id).eq(0..N));
    let s = stream.stats();
    assert_eq!((s.received, s.processed, s.in_flight), (N, N, 0));
    joined(&stream);
    assert_eq!(server.finish(), Some(1000));
}

#[test]
fn close_lets_every_received_message_finish() {
    let server = serve_ws(|ws| stream_until_closed(ws, 1, Duration::from_millis(1)));
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Json, 2, 16),
        Recorder::sleeping(Duration::from_micros(200)),
    )
    .expect("start");
    connected(&stream);
    let mut results = Vec::new();
    let end = pull_until(&stream, &mut results, Duration::from_secs(5), |r| {
        r.len() >= 30
    });
    assert!(end.is_none(), "the stream ended early: {end:?}");
    stream.close();
    stream.close(); // idempotent
    let (rest, end) = collect(&stream, Duration::from_secs(5));
    results.extend(rest);
    assert_eq!(end, None);
    let s = stream.stats();
    assert_eq!(results.len() as u64, s.received);
    assert_eq!(
        (s.processed, s.failed, s.cancelled, s.in_flight),
        (s.received, 0, 0, 0)
    );
    let mut ids: Vec<u64> = results.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert!(ids.into_iter().eq(0..s.received));
    joined(&stream);
    let saw = server.finish();
    assert_eq!(saw.close, Some(1000), "{saw:?}");
    assert!(saw.sent >= s.received, "{saw:?} {s:?}");
}

#[test]
fn cancel_drops_queued_jobs_and_counts_them() {
    let server = serve_ws(|ws| stream_until_closed(ws, 50, Duration::from_millis(1)));
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Json, 2, 16),
        Recorder::sleeping(Duration::from_millis(2)),
    )
    .expect("start");
    connected(&stream);
    let mut results = Vec::new();
    let end = pull_until(&stream, &mut results, Duration::from_secs(5), |r| {
        r.len() >= 10
    });
    assert!(end.is_none(), "the stream ended early: {end:?}");
    // Let the queues fill up behind the slow workers.
    std::thread::sleep(Duration::from_millis(100));
    stream.cancel();
    joined(&stream);
    let s = stream.stats();
    assert!(s.cancelled > 0, "{s:?}");
    assert_eq!(s.received, s.processed + s.failed + s.cancelled, "{s:?}");
    assert_eq!(s.in_flight, 0);
    // Results not taken are dropped with the result queue.
    assert!(results.len() as u64 <= s.processed);
    assert!(matches!(
        stream.next_batch(10, Duration::from_millis(10)),
        Batch::End(None)
    ));
    let saw = server.finish();
    // The close frame goes out, but the client does not wait for the reply, so the server may
    // see the connection reset first.
    assert!(saw.close.is_none_or(|c| c == 1000), "{saw:?}");
}

#[test]
fn the_overall_timeout_closes_gracefully() {
    let server = serve_ws(|ws| stream_until_closed(ws, 1, Duration::from_millis(1)));
    let mut cfg = config(&server.url(), DecodeMode::Json, 2, 16);
    cfg.timeout = Some(Duration::from_millis(300));
    let started = Instant::now();
    let stream = Stream::start(cfg, Recorder::default()).expect("start");
    let (results, end) = collect(&stream, Duration::from_secs(5));
    let took = started.elapsed();
    assert_eq!(end, None);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let s = stream.stats();
    assert!(!results.is_empty());
    assert_eq!(results.len() as u64, s.received);
    joined(&stream);
    assert_eq!(server.finish().close, Some(1000));
}

#[test]
fn decode_modes_report_errors_and_keep_bytes() {
    let frames = vec![
        Message::text("not json"),
        Message::binary(vec![0u8, 159, 146, 150, 255]),
        Message::text("{\"a\":[1,2]}"),
    ];
    let run = move |mode: DecodeMode| {
        let frames = frames.clone();
        let server = serve_ws(move |mut ws| async move {
            for frame in frames {
                ws.feed(frame).await.expect("feed");
            }
            ws.flush().await.expect("flush");
            close_with(&mut ws, 1000, "").await;
        });
        let stream =
            Stream::start(config(&server.url(), mode, 1, 4), Recorder::default()).expect("start");
        let (results, end) = collect(&stream, Duration::from_secs(5));
        assert_eq!(end, None);
        let stats = stream.stats();
        joined(&stream);
        server.finish();
        (results, stats)
    };

    let (json, stats) = run(DecodeMode::Json);
    assert_eq!(json.len(), 3);
    let message = json[0].data.clone().expect_err("not json");
    assert!(
        message.starts_with("payload is not valid JSON"),
        "{message}"
    );
    assert!(json[1].data.is_err());
    let doc = Json::from_value(&json!({"a": [1, 2]})).expect("json");
    assert_eq!(json[2].data, Ok(Data::Json(doc)));
    assert_eq!((stats.processed, stats.failed), (1, 2));

    let (bytes, stats) = run(DecodeMode::Bytes);
    assert_eq!(bytes[0].data, Ok(Data::Bytes("not json".into())));
    assert_eq!(bytes[1].kind, Kind::Binary);
    assert_eq!(
        bytes[1].data,
        Ok(Data::Bytes(vec![0u8, 159, 146, 150, 255].into()))
    );
    assert_eq!((stats.processed, stats.failed), (3, 0));

    let (text, stats) = run(DecodeMode::Text);
    assert_eq!(text[0].data, Ok(Data::Text("not json".into())));
    let message = text[1].data.clone().expect_err("invalid UTF-8");
    assert!(
        message.starts_with("binary payload is not valid UTF-8"),
        "{message}"
    );
    assert_eq!((stats.processed, stats.failed), (2, 1));
}

#[test]
fn a_panicking_job_yields_an_error_result_and_the_stream_goes_on() {
    let server = serve_ws(|mut ws| async move {
        ws.feed(Message::text("a")).await.expect("feed");
        ws.feed(Message::text("panic")).await.expect("feed");
        ws.feed(Message::text("b")).await.expect("feed");
        ws.flush().await.expect("flush");
        close_with(&mut ws, 1000, "").await;
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 1, 4),
        Recorder::default(),
    )
    .expect("start");
    let (results, end) = collect(&stream, Duration::from_secs(5));
    assert_eq!(end, None);
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].data, Ok(Data::Text("a".into())));
    let message = results[1].data.clone().expect_err("panicked");
    assert!(
        message.contains("job 1 panicked: deliberate panic"),
        "{message}"
    );
    assert_eq!(results[2].data, Ok(Data::Text("b".into())));
    let s = stream.stats();
    assert_eq!((s.processed, s.failed), (2, 1));
    joined(&stream);
    server.finish();
}

#[test]
fn pings_are_answered_and_carry_no_job() {
    let server = serve_ws(|mut ws| async move {
        ws.send(Message::Ping("are you there".into()))
            .await
            .expect("ping");
        send_texts(&mut ws, 0..2).await.expect("send");
        let pong = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
        close_with(&mut ws, 1000, "").await;
        format!("{pong:?}")
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 1, 4),
        Recorder::default(),
    )
    .expect("start");
    let (results, end) = collect(&stream, Duration::from_secs(5));
    assert_eq!(end, None);
    assert_eq!(results.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 1]);
    joined(&stream);
    let pong = server.finish();
    assert!(
        pong.contains("Pong") && pong.contains("are you there"),
        "{pong}"
    );
}

#[test]
fn dropping_the_stream_closes_the_connection() {
    let server = serve_ws(|ws| stream_until_closed(ws, 1, Duration::from_millis(1)));
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 2, 16),
        Recorder::default(),
    )
    .expect("start");
    let mut results = Vec::new();
    let end = pull_until(&stream, &mut results, Duration::from_secs(5), |r| {
        r.len() >= 5
    });
    assert!(end.is_none());
    let started = Instant::now();
    drop(stream);
    let saw = server.finish();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(saw.close == Some(1000) || saw.error.is_some(), "{saw:?}");
}

#[test]
fn bad_arguments_fail_before_any_thread_starts() {
    let bad = |url: &str, workers: usize, queue: usize| {
        Stream::start(
            config(url, DecodeMode::Text, workers, queue),
            Recorder::default(),
        )
        .err()
        .expect("start should fail")
    };
    assert!(matches!(
        bad("http://127.0.0.1:1/", 1, 1),
        Error::InvalidUrl { .. }
    ));
    assert!(matches!(
        bad("ws://127.0.0.1:1/", 0, 1),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        bad("ws://127.0.0.1:1/", 1, 0),
        Error::InvalidArgument(_)
    ));
}

/// Regression: a cancel that arrives while the read loop waits on a full job queue must count
/// the job in hand exactly once (it was once counted by the read loop as cancelled although flume
/// had already moved it into the queue, and then again by a worker).
#[test]
fn cancel_under_backpressure_counts_each_job_once() {
    for round in 0..10 {
        let server = serve_ws(|ws| stream_until_closed(ws, 50, Duration::from_millis(1)));
        let stream = Stream::start(
            config(&server.url(), DecodeMode::Text, 2, 4),
            Recorder::default(),
        )
        .expect("start");
        connected(&stream);
        // Pull nothing: both queues fill, the workers block on the result queue and the read
        // loop blocks on the job queue with one more job in hand.
        std::thread::sleep(Duration::from_millis(50));
        stream.cancel();
        joined(&stream);
        let s = stream.stats();
        assert_eq!(
            s.received,
            s.processed + s.failed + s.cancelled,
            "round {round}: {s:?}"
        );
        server.finish();
    }
}

/// Regression: after a successful connect, `wait_connected` stays `Some(Ok)` even once the stream
/// has ended with an error (it used to answer with the end error).
#[test]
fn wait_connected_stays_ok_after_an_abnormal_end() {
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..3).await.expect("send");
        close_with(&mut ws, 1011, "boom").await
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 1, 4),
        Recorder::default(),
    )
    .expect("start");
    connected(&stream);
    let (results, end) = collect(&stream, Duration::from_secs(5));
    assert_eq!(results.len(), 3);
    assert!(matches!(end, Some(Error::Closed { code: 1011, .. })));
    assert_eq!(
        stream.wait_connected(Duration::from_millis(10)),
        Some(Ok(()))
    );
    joined(&stream);
    server.finish();
}

/// Regression: the end error is recorded before `End` can be reported (the read loop used to
/// close the job queue first, so `End(None)` came in ~5-10% of runs). Runs the
/// drop-without-close-frame case 100 times and wants the error every time.
#[test]
fn the_end_error_is_set_before_the_end_is_reported() {
    let mut lost = 0;
    for _ in 0..100 {
        let server = serve_ws(|mut ws| async move {
            send_texts(&mut ws, 0..3).await.expect("send");
        });
        let stream = Stream::start(
            config(&server.url(), DecodeMode::Bytes, 1, 4),
            Recorder::default(),
        )
        .expect("start");
        let (results, end) = collect(&stream, Duration::from_secs(5));
        assert_eq!(results.len(), 3);
        if end.is_none() {
            lost += 1;
        }
        joined(&stream);
        server.finish();
    }
    assert_eq!(
        lost, 0,
        "End(None) instead of Closed 1006 in {lost} runs of 100"
    );
}

#[test]
fn a_batch_stops_at_its_byte_budget_and_nothing_is_lost() {
    const N: u64 = 300;
    const SIZE: usize = 10_000;
    let server = binary_stream(N, SIZE);
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Bytes, 2, 512),
        Recorder::default(),
    )
    .expect("start");
    connected(&stream);
    // Enough results waiting for the first two batches to reach their limits (the result
    // queue is bounded, so not all of them).
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.stats().processed < 14 {
        assert!(Instant::now() < deadline, "{:?}", stream.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    let size = |o: &common::Out| match &o.data {
        Ok(Data::Bytes(b)) => b.len(),
        other => panic!("unexpected {other:?}"),
    };
    let mut ids = Vec::new();
    let mut sizes = Vec::new();
    let mut round = 0;
    loop {
        // Alternate between a byte budget of 64 KiB (7 results of 10 kB: the one that
        // crosses it is taken) and a count of 3, so both limits and the leftover are used.
        let batch = if round % 2 == 0 {
            stream.next_batch_within(1024, 64 * 1024, size, Duration::from_secs(2))
        } else {
            stream.next_batch_within(3, usize::MAX, size, Duration::from_secs(2))
        };
        match batch {
            Batch::Items(items) => {
                assert!(!items.is_empty());
                sizes.push((round % 2, items.len()));
                ids.extend(items.iter().map(|o| o.id));
            }
            Batch::End(None) => break,
            other => panic!("unexpected {other:?}"),
        }
        round += 1;
    }
    ids.sort_unstable();
    assert_eq!(ids, (0..N).collect::<Vec<_>>());
    assert!(
        sizes.iter().all(|&(kind, n)| n <= [7, 3][kind]),
        "{sizes:?}"
    );
    assert!(
        sizes.contains(&(0, 7)) && sizes.contains(&(1, 3)),
        "{sizes:?}"
    );
    joined(&stream);
    assert_eq!(server.finish(), Some(1000));
}

/// A processor with nothing to run on bytes (as `decode="bytes"` without a handler): the job is
/// the result. With one worker the stream starts none; `process` counts its calls so that the
/// tests see it is never called.
#[derive(Clone, Default)]
struct Passthrough {
    processed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl wspool::Processor for Passthrough {
    type Output = wspool::Job;

    fn process(
        &self,
        job: wspool::Job,
        _: Result<Data, wspool::DecodeError>,
    ) -> (wspool::Job, bool) {
        self.processed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (job, true)
    }

    fn panicked(&self, job: wspool::Job, _: Error) -> wspool::Job {
        job
    }

    fn passthrough(&self, mode: DecodeMode) -> Option<fn(wspool::Job) -> wspool::Job> {
        (mode == DecodeMode::Bytes).then_some(|job| job)
    }
}

/// A server sending `n` binary messages of `size` bytes, each starting with its seq (8 bytes,
/// little-endian), then a close frame (1000).
fn binary_stream(n: u64, size: usize) -> Server<Option<u16>> {
    serve_ws(move |mut ws| async move {
        for seq in 0..n {
            let mut payload = vec![b'x'; size];
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            ws.feed(Message::binary(payload)).await.expect("send");
        }
        ws.flush().await.expect("flush");
        close_with(&mut ws, 1000, "bye").await
    })
}

fn seq_of(job: &wspool::Job) -> u64 {
    u64::from_le_bytes(job.payload[..8].try_into().expect("8 bytes"))
}

#[test]
fn with_nothing_to_run_the_consumer_takes_jobs_straight_from_the_queue() {
    const N: u64 = 3000;
    const SIZE: usize = 1000;
    let server = binary_stream(N, SIZE);
    let processor = Passthrough::default();
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Bytes, 1, 64),
        processor.clone(),
    )
    .expect("start");
    connected(&stream);
    // Only the read loop runs: no worker thread.
    assert_eq!(stream.stats().threads, 1);
    let mut jobs = Vec::new();
    let mut biggest = 0;
    let end = loop {
        match stream.next_batch_within(
            1000,
            8 * SIZE,
            |j: &wspool::Job| j.payload.len(),
            Duration::from_secs(5),
        ) {
            Batch::Items(items) => {
                biggest = biggest.max(items.len());
                jobs.extend(items);
            }
            Batch::Pending => panic!("no job within 5 s: {:?}", stream.stats()),
            Batch::End(e) => break e,
        }
    };
    assert_eq!(end, None);
    // Receipt order, every payload whole, and no batch past its byte budget.
    assert!(jobs.iter().map(|j| j.id).eq(0..N));
    assert!(jobs.iter().map(seq_of).eq(0..N));
    assert!(jobs.iter().all(|j| j.payload.len() == SIZE));
    assert!(biggest <= 8, "a batch of {biggest} jobs of {SIZE} B");
    assert_eq!(
        processor
            .processed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let s = stream.stats();
    assert_eq!((s.received, s.processed, s.in_flight), (N, N, 0));
    joined(&stream);
    assert_eq!(server.finish(), Some(1000));
}

#[test]
fn with_nothing_to_run_a_slow_consumer_stops_the_reading_and_cancel_counts_the_queue() {
    const QUEUE: usize = 8;
    let server = serve_ws(|ws| stream_until_closed(ws, 50, Duration::from_millis(1)));
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Bytes, 1, QUEUE),
        Passthrough::default(),
    )
    .expect("start");
    connected(&stream);
    let mut taken = 0;
    while taken < 20 {
        if let Batch::Items(items) = stream.next_batch(5, Duration::from_secs(5)) {
            assert!(items.len() <= 5);
            taken += items.len() as u64;
        }
    }
    // Pull nothing for 200 ms: the job queue fills and reading stops. Read by then, at most:
    // what was taken, the queue (one more at a stop) and the read loop's run.
    let bound = taken + (QUEUE * 2 + 1) as u64;
    read_while_paused(&stream, bound);
    stream.cancel();
    joined(&stream);
    let s = stream.stats();
    assert_eq!(s.processed, taken, "{s:?}");
    assert!(s.cancelled > 0, "{s:?}");
    assert_eq!(
        (s.received, s.in_flight),
        (s.processed + s.cancelled, 0),
        "{s:?}"
    );
    assert!(matches!(
        stream.next_batch(10, Duration::from_millis(10)),
        Batch::End(None)
    ));
    server.finish();
}

#[test]
fn dropping_a_stream_with_nothing_to_run_counts_what_it_never_took() {
    let server = binary_stream(100, 10);
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Bytes, 1, 256),
        Passthrough::default(),
    )
    .expect("start");
    connected(&stream);
    // The whole stream is read and the read loop ends; nothing is taken.
    assert!(stream.join(Duration::from_secs(5)));
    let s = stream.stats();
    assert_eq!((s.received, s.processed, s.in_flight), (100, 0, 100));
    stream.cancel();
    let s = stream.stats();
    assert_eq!((s.cancelled, s.in_flight), (100, 0), "{s:?}");
    server.finish();
}

#[test]
fn with_nothing_to_run_but_several_workers_or_text_the_pool_runs() {
    for (decode, workers) in [(DecodeMode::Bytes, 2), (DecodeMode::Text, 1)] {
        let server = binary_stream(50, 10);
        let processor = Passthrough::default();
        let stream = Stream::start(
            config(&server.url(), decode, workers, 16),
            processor.clone(),
        )
        .expect("start");
        let (jobs, end) = collect(&stream, Duration::from_secs(5));
        assert_eq!((jobs.len(), end), (50, None));
        assert_eq!(
            processor
                .processed
                .load(std::sync::atomic::Ordering::SeqCst),
            50,
            "{decode:?} x {workers}"
        );
        joined(&stream);
        server.finish();
    }
}

/// Regression: a consumer waiting for jobs on a stream with no workers holds no lock: other
/// calls (`cancel`, another `next_batch`) go on at once (the wait used to hold the lock they
/// take, for as long as it lasted).
#[test]
fn a_consumer_waiting_on_a_stream_with_no_workers_blocks_no_other_call() {
    let server = serve_ws(|ws| async move {
        // Holds the connection open, sending and reading nothing.
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(ws);
    });
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Bytes, 1, 16),
        Passthrough::default(),
    )
    .expect("start");
    connected(&stream);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| stream.next_batch(16, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        assert!(matches!(
            stream.next_batch(1, Duration::ZERO),
            Batch::Pending
        ));
        stream.cancel();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(matches!(waiter.join().expect("no panic"), Batch::End(None)));
    });
    joined(&stream);
    server.finish();
}

/// A result whose drop calls `cancel` on the stream it came from, as a Python result's
/// `__del__` may: armed per thread, so only the drops the test provokes call back.
struct Reentrant;

thread_local! {
    static CALL_BACK: std::cell::RefCell<Option<std::sync::Arc<Stream<Reentrant>>>> =
        const { std::cell::RefCell::new(None) };
}

impl Drop for Reentrant {
    fn drop(&mut self) {
        let stream = CALL_BACK.with(|s| s.borrow().clone());
        if let Some(stream) = stream {
            stream.cancel();
        }
    }
}

#[derive(Clone)]
struct MakesReentrant;

impl wspool::Processor for MakesReentrant {
    type Output = Reentrant;

    fn process(&self, _: wspool::Job, _: Result<Data, wspool::DecodeError>) -> (Reentrant, bool) {
        (Reentrant, true)
    }

    fn panicked(&self, _: wspool::Job, _: Error) -> Reentrant {
        Reentrant
    }
}

#[test]
fn results_freed_by_cancel_may_call_back_into_the_stream() {
    const N: u64 = 2000;
    let server = binary_stream(N, 16);
    let stream = std::sync::Arc::new(
        Stream::start(
            config(&server.url(), DecodeMode::Bytes, 1, 4096),
            MakesReentrant,
        )
        .expect("start"),
    );
    // Every result made and waiting; the read loop and the worker are gone, so the results
    // still in the channel are freed with its receiver.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.stats().processed < N || stream.stats().threads > 0 {
        assert!(Instant::now() < deadline, "{:?}", stream.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    // Taken one at a time, so that the workers' batches (up to 64 once the jobs are seen to
    // be cheap) are split and the rest of each waits as the stream's leftover.
    for _ in 0..100 {
        match stream.next_batch(1, Duration::from_secs(1)) {
            Batch::Items(items) => assert_eq!(items.len(), 1),
            Batch::Pending => panic!("no result within 1 s"),
            Batch::End(e) => panic!("the stream ended early: {e:?}"),
        }
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let canceller = stream.clone();
    std::thread::spawn(move || {
        CALL_BACK.with(|s| *s.borrow_mut() = Some(canceller.clone()));
        canceller.cancel();
        CALL_BACK.with(|s| *s.borrow_mut() = None);
        done_tx.send(()).expect("send");
    });
    // Before the fix the first callback waited for a lock its own thread held.
    assert!(
        done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "cancel deadlocked freeing a result that called back into the stream"
    );
    assert!(matches!(
        stream.next_batch(1, Duration::from_millis(100)),
        Batch::End(_)
    ));
}

/// Takes every result as an event loop does: `next_batch` without waiting, and when it finds
/// nothing, `arm` and a wait for the ring. Returns how many results came, whether the end did,
/// and how many waits there were (each ended by a ring, never by the 5 s limit; a message that
/// comes after the consumer armed is only seen through its ring).
fn drain_by_bell<O: Send + 'static>(stream: &Stream<O>) -> (usize, bool, usize) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    assert!(stream.set_ringer(Box::new(move || {
        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(());
    })));
    assert!(
        !stream.set_ringer(Box::new(|| {})),
        "the ringer is set once"
    );
    let (mut got, mut waits) = (0, 0);
    loop {
        match stream.next_batch(1024, Duration::ZERO) {
            Batch::Items(items) => got += items.len(),
            Batch::End(_) => return (got, true, waits),
            Batch::Pending => {
                if stream.arm() {
                    waits += 1;
                    // A ring may be stale (rung while an arming that found results was
                    // being undone): the consumer then looks, finds nothing and waits again.
                    rx.recv_timeout(Duration::from_secs(5))
                        .expect("armed, results came or the stream ended, but no ring");
                }
            }
        }
    }
}

/// A server sending `n` text messages 20 ms apart, then a close frame (1000).
fn slow_stream(n: u64) -> Server<Option<u16>> {
    serve_ws(move |mut ws| async move {
        for seq in 0..n {
            tokio::time::sleep(Duration::from_millis(20)).await;
            ws.send(Message::text(text_payload(seq)))
                .await
                .expect("send");
        }
        close_with(&mut ws, 1000, "bye").await
    })
}

#[test]
fn a_consumer_waiting_outside_next_batch_is_rung_for_each_result_and_the_end() {
    // No worker (the consumer takes jobs from the queue itself), then a pool of two.
    let server = slow_stream(10);
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Bytes, 1, 64),
        Passthrough::default(),
    )
    .expect("start");
    let (got, ended, waits) = drain_by_bell(&stream);
    assert_eq!((got, ended), (10, true));
    assert!(
        waits >= 10,
        "each message 20 ms apart is waited for: {waits}"
    );

    let server = slow_stream(10);
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 2, 64),
        Recorder::default(),
    )
    .expect("start");
    let (got, ended, waits) = drain_by_bell(&stream);
    assert_eq!((got, ended), (10, true));
    assert!(waits >= 10, "{waits}");
}

#[test]
fn cancel_rings_a_consumer_waiting_outside_next_batch() {
    let server = slow_stream(1000);
    let stream = std::sync::Arc::new(
        Stream::start(
            config(&server.url(), DecodeMode::Text, 2, 64),
            Recorder::default(),
        )
        .expect("start"),
    );
    let canceller = stream.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        canceller.cancel();
    });
    let started = Instant::now();
    let (got, ended, _) = drain_by_bell(&stream);
    assert!(ended && got < 1000, "{got}");
    assert!(started.elapsed() < Duration::from_secs(3));
}
