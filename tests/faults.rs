//! Faults in the native core: stuck jobs given up on (abandoned, every job accounted for), the
//! 1001 close of a consumer going away, and (with the cargo feature `test-panic`) panics on the
//! I/O thread and on a worker outside the per-job guard.

mod common;

use std::time::{Duration, Instant};

use wspool::{DecodeMode, StatsSnapshot, Stream};

use common::*;

fn assert_accounted(s: &StatsSnapshot) {
    assert_eq!(s.in_flight, 0, "{s:?}");
    assert_eq!(
        s.processed + s.failed + s.cancelled + s.dropped + s.abandoned,
        s.received,
        "{s:?}"
    );
}

fn wait_until<O: Send + 'static>(stream: &Stream<O>, what: impl Fn(&StatsSnapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !what(&stream.stats()) {
        assert!(Instant::now() < deadline, "{:?}", stream.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stuck_jobs_are_abandoned_and_the_server_hears_going_away() {
    // One message every 5 ms: `received` counts a message when it is read, and a burst is
    // queued only once read whole, so after a burst both workers might not have a job yet.
    let server = serve_ws(|ws| stream_until_closed(ws, 1, Duration::from_millis(5)));
    // Every job takes 1.5 s: both workers are stuck as far as the owner cares.
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 2, 16),
        Recorder::sleeping(Duration::from_millis(1500)),
    )
    .expect("start");
    connected(&stream);
    wait_until(&stream, |s| s.received >= 10);
    stream.cancel_going_away();
    assert!(!stream.join(Duration::from_millis(100)));
    assert_eq!(stream.abandon(), 2);
    let s = stream.stats();
    assert_eq!((s.processed, s.abandoned), (0, 2), "{s:?}");
    assert_accounted(&s);
    // The handlers return later: not counted again, and the threads end.
    joined(&stream);
    let s = stream.stats();
    assert_eq!((s.processed, s.abandoned), (0, 2), "{s:?}");
    assert_accounted(&s);
    let saw = server.finish();
    assert_eq!(saw.close, Some(1001), "{saw:?}");
}

#[test]
fn a_plain_cancel_still_closes_with_1000() {
    let server = serve_ws(|ws| stream_until_closed(ws, 50, Duration::from_millis(1)));
    let stream = Stream::start(
        config(&server.url(), DecodeMode::Text, 2, 16),
        Recorder::default(),
    )
    .expect("start");
    connected(&stream);
    // Nobody takes results: the queues fill and reading pauses; cancel from there.
    wait_until(&stream, |s| s.received >= 20);
    stream.cancel();
    joined(&stream);
    assert_accounted(&stream.stats());
    assert_eq!(server.finish().close, Some(1000));
}

#[cfg(feature = "test-panic")]
mod panics {
    use super::*;
    use tokio_tungstenite::tungstenite::Message;
    use wspool::Error;

    #[test]
    fn a_panic_on_the_io_thread_ends_the_stream_with_an_internal_error() {
        let server = serve_ws(|ws| stream_until_closed(ws, 10, Duration::from_millis(5)));
        let url = format!("{}?wspool_test_panic=io", server.url());
        let stream = Stream::start(config(&url, DecodeMode::Text, 2, 16), Recorder::default())
            .expect("start");
        let (_results, end) = collect(&stream, Duration::from_secs(5));
        match end {
            Some(Error::Internal(m)) => assert!(m.contains("I/O thread panicked"), "{m}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        joined(&stream);
        assert_accounted(&stream.stats());
        drop(server);
    }

    #[test]
    fn a_worker_that_dies_ends_the_stream_and_its_job_is_abandoned() {
        let server = serve_ws(|mut ws| async move {
            use futures_util::SinkExt;
            for i in 0..20 {
                let text = if i == 7 {
                    "wspool_test_panic=worker".to_string()
                } else {
                    format!("m{i}")
                };
                ws.send(Message::text(text)).await.expect("send");
            }
            drain(&mut ws).await
        });
        let stream = Stream::start(
            config(&server.url(), DecodeMode::Text, 2, 16),
            Recorder::default(),
        )
        .expect("start");
        let (results, end) = collect(&stream, Duration::from_secs(5));
        match end {
            Some(Error::Internal(m)) => assert!(m.contains("died of a panic"), "{m}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        joined(&stream);
        let s = stream.stats();
        assert_eq!(s.abandoned, 1, "{s:?}");
        // The results the dead worker had made in its batch died with it (they are counted).
        assert!(results.len() as u64 <= s.processed + s.failed, "{s:?}");
        assert_accounted(&s);
        drop(server);
    }
}
