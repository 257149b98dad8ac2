//! Real-feed behaviour of the native core against local servers: reconnects, heartbeats, the
//! message size limit and the overflow policies. Every wait is bounded.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use wspool::{DecodeMode, Error, Event, EventHook, Overflow, Reconnect, Stream};

fn reconnect_fast() -> Reconnect {
    Reconnect {
        max_attempts: Some(3),
        initial: Duration::from_millis(10),
        maximum: Duration::from_millis(50),
        jitter: true,
    }
}

fn recorded_events() -> (EventHook, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let hook = EventHook(Arc::new(move |e: &Event| {
        sink.lock().expect("events").push(e.clone())
    }));
    (hook, events)
}

#[test]
fn reconnects_across_drops_and_numbers_connections() {
    // Connections 0-4 send 10 messages each and drop without a close frame; 5 ends normally.
    let server = serve_ws_many(6, |i, mut ws| async move {
        let base = i as u64 * 10;
        send_texts(&mut ws, base..base + 10).await.expect("send");
        if i < 5 {
            drop(ws);
        } else {
            close_with(&mut ws, 1000, "").await;
        }
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 2, 8);
    cfg.reconnect = Some(reconnect_fast());
    let (hook, events) = recorded_events();
    cfg.on_event = Some(hook);
    let stream = Stream::start(cfg, Recorder::default()).expect("start");
    connected(&stream);
    let (results, end) = collect(&stream, Duration::from_secs(10));
    server.finish();
    assert_eq!(end, None);
    let mut seen: Vec<(u64, u32)> = results.iter().map(|r| (r.id, r.connection)).collect();
    seen.sort_unstable();
    let expected: Vec<(u64, u32)> = (0..60).map(|id| (id, (id / 10) as u32)).collect();
    assert_eq!(
        seen, expected,
        "every message of every connection, numbered"
    );
    assert_eq!(stream.stats().reconnects, 5);
    let events = events.lock().expect("events");
    let count = |f: fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    assert_eq!(count(|e| matches!(e, Event::Connected { .. })), 6);
    assert_eq!(
        count(|e| matches!(e, Event::Retrying { attempt: 1, .. })),
        5
    );
    assert!(matches!(
        &events[1],
        Event::Disconnected {
            connection: 0,
            cause: Some(Error::Closed { code: 1006, .. })
        }
    ));
    assert!(matches!(
        events.last(),
        Some(Event::Disconnected {
            connection: 5,
            cause: None
        })
    ));
    joined(&stream);
}

#[test]
fn gives_up_after_max_attempts_with_the_last_cause() {
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..3).await.expect("send");
        close_with(&mut ws, 1011, "internal").await;
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 1, 8);
    cfg.reconnect = Some(reconnect_fast());
    let stream = Stream::start(cfg, Recorder::default()).expect("start");
    connected(&stream);
    let (results, end) = collect(&stream, Duration::from_secs(10));
    server.finish();
    assert_eq!(results.len(), 3);
    // After the 1011 close, three attempts are refused (the listener is gone).
    match end {
        Some(Error::Connect { cause, .. }) => assert!(cause.contains("refused"), "{cause}"),
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

#[test]
fn a_frozen_server_is_detected_by_the_heartbeat() {
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..5).await.expect("send");
        // Frozen: neither reads (so never answers pings) nor closes, for longer than the test.
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(ws);
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 1, 8);
    cfg.heartbeat.interval = Some(Duration::from_millis(150));
    cfg.heartbeat.timeout = Some(Duration::from_millis(150));
    let stream = Stream::start(cfg, Recorder::default()).expect("start");
    connected(&stream);
    let started = Instant::now();
    let (results, end) = collect(&stream, Duration::from_secs(5));
    let took = started.elapsed();
    assert_eq!(results.len(), 5);
    match end {
        Some(Error::Closed { code: 1006, reason }) => {
            assert!(reason.contains("ping_timeout"), "{reason}")
        }
        other => panic!("expected a heartbeat timeout, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
        "detected after {took:?}, bound 300 ms"
    );
    server.finish();
}

#[test]
fn a_slow_consumer_does_not_blame_a_live_server() {
    // 300 messages at once, then idle but alive (reading, so pings are answered), then a close.
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..300).await.expect("send");
        let _ = tokio::time::timeout(Duration::from_millis(1500), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        close_with(&mut ws, 1000, "").await;
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 1, 2);
    cfg.heartbeat.interval = Some(Duration::from_millis(50));
    cfg.heartbeat.timeout = Some(Duration::from_millis(50));
    // 300 x 3 ms: reading is paused by backpressure for far longer than the heartbeat bound.
    let stream = Stream::start(cfg, Recorder::sleeping(Duration::from_millis(3))).expect("start");
    connected(&stream);
    let (results, end) = collect(&stream, Duration::from_secs(8));
    assert_eq!(end, None);
    assert_eq!(results.len(), 300);
    server.finish();
}

#[test]
fn an_oversize_message_is_refused_with_1009() {
    let server = serve_ws(|mut ws| async move {
        send_texts(&mut ws, 0..2).await.expect("send");
        let big = "x".repeat(2 << 20);
        let _ = futures_util::SinkExt::send(&mut ws, Message::text(big)).await;
        drain(&mut ws).await
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 1, 8);
    cfg.max_message_size = 1 << 20;
    let stream = Stream::start(cfg, Recorder::default()).expect("start");
    connected(&stream);
    let (results, end) = collect(&stream, Duration::from_secs(5));
    assert_eq!(results.len(), 2);
    match end {
        Some(Error::MessageTooBig { limit, .. }) => assert_eq!(limit, 1 << 20),
        other => panic!("expected MessageTooBig, got {other:?}"),
    }
    assert_eq!(server.finish(), Some(1009));
}

/// 400 messages at once into one slow worker with a queue of 4, under `overflow`.
fn flood(overflow: Overflow) -> (Vec<Out>, Option<Error>, wspool::StatsSnapshot, Option<u16>) {
    let server = serve_ws(|mut ws| async move {
        // With overflow="error" the client may close first: sending can fail then.
        if send_texts(&mut ws, 0..400).await.is_ok() {
            let _ = futures_util::SinkExt::close(&mut ws).await;
        }
        drain(&mut ws).await
    });
    let mut cfg = config(&server.url(), DecodeMode::Text, 1, 4);
    cfg.overflow = overflow;
    let stream = Stream::start(cfg, Recorder::sleeping(Duration::from_millis(1))).expect("start");
    connected(&stream);
    let (results, end) = collect(&stream, Duration::from_secs(8));
    joined(&stream);
    (results, end, stream.stats(), server.finish())
}

#[test]
fn drop_policies_count_every_dropped_message() {
    for overflow in [Overflow::DropNewest, Overflow::DropOldest] {
        let (results, end, stats, _) = flood(overflow);
        assert_eq!(end, None, "{overflow:?}");
        assert_eq!(stats.received, 400);
        assert!(stats.dropped > 0, "{overflow:?}: nothing dropped");
        assert_eq!(results.len() as u64 + stats.dropped, 400, "{overflow:?}");
        assert_eq!(stats.processed, results.len() as u64);
        let ids: Vec<u64> = results.iter().map(|r| r.id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "one worker keeps order"
        );
        if overflow == Overflow::DropOldest {
            assert_eq!(ids.last(), Some(&399), "the newest survives drop_oldest");
        }
    }
}

#[test]
fn overflow_error_ends_the_stream_with_1008() {
    let (results, end, stats, close) = flood(Overflow::Error);
    match end {
        Some(Error::Overflow {
            capacity: 4,
            job_id,
        }) => {
            assert_eq!(
                results.len() as u64,
                job_id,
                "every message before it was processed"
            );
            // The overflowing message, and any read in the same run after it, are dropped.
            assert!(stats.dropped >= 1);
            assert_eq!(results.len() as u64 + stats.dropped, stats.received);
        }
        other => panic!("expected Overflow, got {other:?}"),
    }
    assert_eq!(close, Some(1008));
}
