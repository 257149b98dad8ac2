//! The read side of a WebSocket connection, on our own buffer: frames are parsed in place and
//! each message's payload is a slice of the buffer (no copy, no zero-filled read space, no
//! per-frame future), with the RFC 6455 checks a client owes. The handshake and everything we
//! send still go through tungstenite; [`Tap`] hands it the server's handshake response and no
//! byte more, so that the frames after it are ours to read. No PyO3 here.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::job::Kind;

/// The size of a read block: the buffer the socket is read into, of which each message's
/// payload is a slice (no copy). A payload keeps its block allocated while it lives, so this is
/// also the most memory one small message can hold (tungstenite's read buffer was as large).
const BLOCK: usize = 128 * 1024;
/// Below this much free room, a read first moves on to another block.
const MIN_ROOM: usize = 32 * 1024;
/// How many used blocks are kept for reuse. A block whose payloads are all gone is read into
/// again rather than freed: fresh memory must be faulted in and zeroed by the kernel page by
/// page, which for large messages cost more than copying them out of a shared buffer (measured
/// at 16 KiB: the zeroing was a third of the reading thread's time). The blocks kept are
/// mapped and warm; at most `SPARE_BLOCKS` x `BLOCK` bytes, beyond the blocks still in use.
const SPARE_BLOCKS: usize = 64;

/// A stream that, until its owner says the handshake is over, returns bytes only up to the end
/// of the HTTP response headers (`\r\n\r\n`); what came after them is kept and returned first
/// by the reads after the handshake. Writes go straight through.
#[derive(Debug)]
pub struct Tap<S> {
    inner: S,
    /// Read past the headers during the handshake; returned before anything else.
    held: BytesMut,
    /// How much of `\r\n\r\n` the bytes returned so far end with (4: the headers are over).
    matched: u8,
}

impl<S> Tap<S> {
    pub fn new(inner: S) -> Self {
        Tap {
            inner,
            held: BytesMut::new(),
            matched: 0,
        }
    }
}

/// How many bytes of `data` (which follow what was returned so far) belong to the headers;
/// `matched` is how much of `\r\n\r\n` the bytes so far end with (4: the headers are over).
fn header_part(matched: &mut u8, data: &[u8]) -> usize {
    for (i, &b) in data.iter().enumerate() {
        let want = b"\r\n\r\n"[*matched as usize];
        *matched = if b == want {
            *matched + 1
        } else if b == b'\r' {
            1
        } else {
            0
        };
        if *matched == 4 {
            return i + 1;
        }
    }
    data.len()
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.held.is_empty() {
            let n = this.held.len().min(buf.remaining());
            let n = if this.matched < 4 {
                header_part(&mut this.matched, &this.held[..n])
            } else {
                n
            };
            buf.put_slice(&this.held[..n]);
            this.held.advance(n);
            return Poll::Ready(Ok(()));
        }
        if this.matched == 4 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // During the handshake: read into a side buffer, pass on the header part only.
        let mut side = vec![0u8; buf.remaining().max(1)];
        let mut side_buf = ReadBuf::new(&mut side);
        match Pin::new(&mut this.inner).poll_read(cx, &mut side_buf) {
            Poll::Ready(Ok(())) => {
                let got = side_buf.filled();
                let n = header_part(&mut this.matched, got);
                buf.put_slice(&got[..n]);
                this.held.extend_from_slice(&got[n..]);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the server sent, a frame or a whole message at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Message(Kind, Bytes),
    Ping(Bytes),
    Pong,
    /// The server's close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Why the frames cannot be read on.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A breach of RFC 6455: the close code to fail the connection with, and what it was.
    Violation(u16, String),
    /// A message over the limit: its size so far (or announced), and the limit.
    TooBig { size: usize, limit: usize },
}

fn violation(what: impl Into<String>) -> FrameError {
    FrameError::Violation(1002, what.into())
}

/// A fragmented message being put together.
struct Partial {
    kind: Kind,
    data: BytesMut,
    /// Text: how much of `data` is known to be valid UTF-8 (a character may be cut at the end).
    checked: usize,
}

impl Partial {
    /// Text: fails as soon as the fragments so far cannot be the start of valid UTF-8 (RFC
    /// 6455 8.1: fail fast), not only once the message is whole.
    fn check_utf8(&mut self) -> Result<(), FrameError> {
        if self.kind != Kind::Text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            // Only cut short: the next fragment may complete it.
            Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
            Err(e) => return Err(invalid_utf8(Some(e))),
        }
        Ok(())
    }
}

fn invalid_utf8(e: Option<std::str::Utf8Error>) -> FrameError {
    let detail = e.map_or_else(String::new, |e| format!(" ({e})"));
    FrameError::Violation(
        1007,
        format!("invalid UTF-8 in a text message or close reason{detail}"),
    )
}

/// Parses frames out of a buffer it fills from the socket; see the module docs.
pub struct FrameReader {
    /// The block being read into: the bytes read and not yet parsed, then free room.
    buf: BytesMut,
    /// Blocks read into before `buf`, emptied, oldest first; their payloads may still be alive.
    spare: VecDeque<BytesMut>,
    /// The size `buf`'s block was allocated with (0: none yet, or not known to be one).
    block: usize,
    /// How many blocks were allocated so far (the rest of the time, one was reused).
    made: u64,
    max_message: usize,
    partial: Option<Partial>,
}

impl FrameReader {
    pub fn new(max_message: usize) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            spare: VecDeque::new(),
            block: 0,
            made: 0,
            max_message,
            partial: None,
        }
    }

    /// Reads what the socket has into the buffer; Ok(0) at the end of the stream. Cancel-safe:
    /// nothing is lost if the future is dropped before it completes.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < MIN_ROOM {
            self.make_room(MIN_ROOM);
        }
        from.read_buf(&mut self.buf).await
    }

    /// At least `want` bytes of free room after the unparsed bytes: in the same block if no
    /// payload still shares it, else in a spare block whose payloads are all gone, else in a
    /// new one. The unparsed bytes (part of a frame at most) move along.
    fn make_room(&mut self, want: usize) {
        if self.buf.capacity() - self.buf.len() >= want || self.buf.try_reclaim(want) {
            return;
        }
        let held = self.buf.len();
        let size = (held + want).max(BLOCK);
        let (mut next, block) = match self.spare.iter_mut().position(|b| b.try_reclaim(size)) {
            Some(i) => (self.spare.remove(i).expect("found above"), BLOCK),
            None => {
                self.made += 1;
                (BytesMut::with_capacity(size), size)
            }
        };
        next.extend_from_slice(&self.buf);
        let mut used = std::mem::replace(&mut self.buf, next);
        used.clear();
        let used_block = std::mem::replace(&mut self.block, block);
        // A block made for one large message is not kept: it would hold its size for good.
        // Nor is one past the count: the blocks kept are the oldest, whose payloads go first.
        if used_block == BLOCK && self.spare.len() < SPARE_BLOCKS {
            self.spare.push_back(used);
        }
    }

    /// The next message or control frame among the bytes read so far; None until more bytes
    /// are needed.
    pub fn next_event(&mut self) -> Result<Option<Event>, FrameError> {
        loop {
            let Some((fin, opcode, start, len)) = self.header()? else {
                return Ok(None);
            };
            if self.buf.len() < start + len {
                // Room for the whole frame, once: the reads after this fill it in place.
                self.make_room(start + len - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(start);
            let payload = self.buf.split_to(len);
            match opcode {
                0x8 => return close_event(&payload).map(Some),
                0x9 => return Ok(Some(Event::Ping(payload.freeze()))),
                0xA => return Ok(Some(Event::Pong)),
                0x0 => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(violation(
                            "a continuation frame with no message to continue",
                        ));
                    };
                    partial.data.extend_from_slice(&payload);
                    partial.check_utf8()?;
                    if fin {
                        let Partial { kind, data, .. } =
                            self.partial.take().expect("checked above");
                        return message(kind, data.freeze()).map(Some);
                    }
                }
                _ => {
                    let kind = if opcode == 0x1 {
                        Kind::Text
                    } else {
                        Kind::Binary
                    };
                    if fin {
                        return message(kind, payload.freeze()).map(Some);
                    }
                    let mut partial = Partial {
                        kind,
                        data: payload,
                        checked: 0,
                    };
                    partial.check_utf8()?;
                    self.partial = Some(partial);
                }
            }
        }
    }

    /// The header of the frame at the start of the buffer, checked: (fin, opcode, header
    /// length, payload length); None if it is not all there yet.
    fn header(&self) -> Result<Option<(bool, u8, usize, usize)>, FrameError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0F);
        if rsv != 0 {
            return Err(violation(
                "a frame has RSV bits set, and no extension was negotiated",
            ));
        }
        if b[1] & 0x80 != 0 {
            return Err(violation("the server sent a masked frame"));
        }
        let (start, len) = match b[1] & 0x7F {
            126 if b.len() < 4 => return Ok(None),
            126 => (4, u64::from(u16::from_be_bytes([b[2], b[3]]))),
            127 if b.len() < 10 => return Ok(None),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (10, u64::from_be_bytes(n))
            }
            n => (2, u64::from(n)),
        };
        match opcode {
            0x8..=0xA => {
                if !fin {
                    return Err(violation("a control frame is fragmented"));
                }
                if len > 125 {
                    return Err(violation("a control frame is over 125 bytes"));
                }
            }
            0x0..=0x2 => {
                let before = match (&self.partial, opcode) {
                    (Some(_), 0x1 | 0x2) => {
                        return Err(violation(
                            "a new data message began before the fragmented one ended",
                        ))
                    }
                    (Some(p), _) => p.data.len() as u64,
                    (None, _) => 0,
                };
                let size = before.saturating_add(len);
                if size > self.max_message as u64 {
                    return Err(FrameError::TooBig {
                        size: usize::try_from(size).unwrap_or(usize::MAX),
                        limit: self.max_message,
                    });
                }
            }
            op @ 0xB..=0xF => return Err(violation(format!("reserved control opcode {op:#x}"))),
            op => return Err(violation(format!("reserved data opcode {op:#x}"))),
        }
        // Within max_message (data) or 125 (control): fits in usize.
        Ok(Some((fin, opcode, start, len as usize)))
    }
}

/// A whole data message; a text one must be UTF-8.
fn message(kind: Kind, payload: Bytes) -> Result<Event, FrameError> {
    if kind == Kind::Text && simdutf8::basic::from_utf8(&payload).is_err() {
        return Err(invalid_utf8(std::str::from_utf8(&payload).err()));
    }
    Ok(Event::Message(kind, payload))
}

/// The server's close frame, checked: a code RFC 6455 allows and a UTF-8 reason.
fn close_event(payload: &[u8]) -> Result<Event, FrameError> {
    match payload {
        [] => Ok(Event::Close(None)),
        [_] => Err(violation("a close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let reason = std::str::from_utf8(reason).map_err(|e| invalid_utf8(Some(e)))?;
            if !CloseCode::from(code).is_allowed() {
                return Err(violation(format!(
                    "the server's close frame has a code RFC 6455 does not allow ({code})"
                )));
            }
            Ok(Event::Close(Some((code, reason.to_string()))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked frame as a server sends it.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xFFFF => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `bytes` one read of `step` bytes at a time; every event, then the error if any.
    fn events(bytes: &[u8], step: usize, max: usize) -> (Vec<Event>, Option<FrameError>) {
        let mut r = FrameReader::new(max);
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            r.buf.extend_from_slice(piece);
            loop {
                match r.next_event() {
                    Ok(Some(e)) => out.push(e),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    fn code(e: Option<FrameError>) -> u16 {
        match e {
            Some(FrameError::Violation(code, _)) => code,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn messages_come_whole_however_the_bytes_are_split() {
        let big = vec![b'a'; 70_000];
        let mut wire = frame(0x81, b"hello");
        wire.extend(frame(0x82, &[0, 1, 2]));
        wire.extend(frame(0x81, &big[..300]));
        wire.extend(frame(0x82, &big));
        // Fragmented text with a ping in between.
        wire.extend(frame(0x01, "h\u{e9}".as_bytes()));
        wire.extend(frame(0x89, b"p"));
        wire.extend(frame(0x80, b"llo"));
        wire.extend(frame(0x8A, b""));
        wire.extend(frame(0x88, &[0x03, 0xE8, b'o', b'k']));
        let want = vec![
            Event::Message(Kind::Text, Bytes::from_static(b"hello")),
            Event::Message(Kind::Binary, Bytes::from_static(&[0, 1, 2])),
            Event::Message(Kind::Text, Bytes::from(big[..300].to_vec())),
            Event::Message(Kind::Binary, Bytes::from(big.clone())),
            Event::Ping(Bytes::from_static(b"p")),
            Event::Message(Kind::Text, Bytes::from("h\u{e9}llo")),
            Event::Pong,
            Event::Close(Some((1000, "ok".into()))),
        ];
        for step in [1, 2, 3, 7, 125, 4096, wire.len()] {
            let (got, err) = events(&wire, step, 1 << 20);
            assert_eq!(err, None, "step {step}");
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn breaches_of_the_protocol_name_the_close_code() {
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (frame(0xC1, b"x"), 1002, "RSV"),
            (vec![0x81, 0x81, 1, 2, 3, 4, b'x'], 1002, "masked"),
            (frame(0x83, b""), 1002, "reserved data opcode 0x3"),
            (frame(0x8B, b""), 1002, "reserved control opcode 0xb"),
            (frame(0x09, b""), 1002, "control frame is fragmented"),
            (frame(0x89, &[0; 126]), 1002, "over 125"),
            (frame(0x80, b"x"), 1002, "no message to continue"),
            (
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
                1002,
                "began before",
            ),
            (frame(0x81, &[0xC3, 0x28]), 1007, "invalid UTF-8"),
            (
                [frame(0x01, &[0xE2, 0x82]), frame(0x80, &[0x28])].concat(),
                1007,
                "invalid UTF-8",
            ),
            // Fails on the first fragment: no valid text starts with 0xFF.
            (frame(0x01, &[b'a', 0xFF]), 1007, "invalid UTF-8"),
            (frame(0x88, &[3]), 1002, "1-byte payload"),
            (frame(0x88, &[0x03, 0xED]), 1002, "does not allow (1005)"),
            (frame(0x88, &[0x03, 0xE8, 0xFF]), 1007, "close reason"),
        ];
        for (wire, want, what) in cases {
            let (_, err) = events(&wire, wire.len(), 1 << 20);
            let message = match &err {
                Some(FrameError::Violation(_, m)) => m.clone(),
                _ => String::new(),
            };
            assert!(message.contains(what), "{what}: got {err:?}");
            assert_eq!(code(err), want, "{what}");
        }
        let (got, err) = events(&frame(0x88, &[]), 1, 10);
        assert_eq!((got, err), (vec![Event::Close(None)], None));
        let (got, _) = events(&frame(0x88, &[0x0F, 0xA0]), 1, 10);
        assert_eq!(got, vec![Event::Close(Some((4000, String::new())))]);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_before_it_is_read() {
        let head = &frame(0x82, &[0; 200])[..4];
        let (_, err) = events(head, 4, 100);
        assert_eq!(
            err,
            Some(FrameError::TooBig {
                size: 200,
                limit: 100
            })
        );
        let wire = [frame(0x02, &[0; 60]), frame(0x80, &[0; 60])].concat();
        let (_, err) = events(&wire, 7, 100);
        assert_eq!(
            err,
            Some(FrameError::TooBig {
                size: 120,
                limit: 100
            })
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        let (_, err) = events(&huge, 10, 100);
        assert!(matches!(err, Some(FrameError::TooBig { limit: 100, .. })));
    }

    /// Reads `n` text messages from `wire` through `fill` and `next_event`, as the read loop does.
    async fn read_frames(r: &mut FrameReader, wire: &mut &[u8], n: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        while out.len() < n {
            match r.next_event().unwrap() {
                Some(Event::Message(Kind::Text, payload)) => out.push(payload),
                Some(other) => panic!("unexpected {other:?}"),
                None => assert!(r.fill(wire).await.unwrap() > 0, "the wire ran out"),
            }
        }
        out
    }

    #[tokio::test]
    async fn read_blocks_are_reused_once_their_payloads_are_gone() {
        let one = frame(0x81, &[b'x'; 16 * 1024]);
        let wire: Vec<u8> = one.iter().copied().cycle().take(one.len() * 2000).collect();
        let mut rest = &wire[..];
        let mut r = FrameReader::new(1 << 20);
        // Each payload dropped as soon as it is read: the one block is read into again.
        for _ in 0..200 {
            drop(read_frames(&mut r, &mut rest, 1).await);
        }
        assert_eq!(r.made, 1);
        // Payloads kept: the reader moves on to new blocks and keeps none of them back.
        let kept = read_frames(&mut r, &mut rest, 400).await;
        let made = r.made;
        assert!(made >= 400 * 16 / 128, "{made} blocks for 6 MiB");
        assert!(kept.iter().all(|p| p.len() == 16 * 1024 && p[0] == b'x'));
        // Once they are gone, the blocks they held serve the next 400.
        drop(kept);
        let again = read_frames(&mut r, &mut rest, 400).await;
        assert!(r.made <= made + 1, "{} blocks made again", r.made - made);
        drop(again);
        assert!(r.spare.len() <= SPARE_BLOCKS);
        // More payloads alive than the spares can hold: the spares stay within their count.
        let kept = read_frames(&mut r, &mut rest, 1000).await;
        assert_eq!(r.spare.len(), SPARE_BLOCKS);
        drop(kept);
        // A block made for a message larger than a block is not kept for reuse.
        let big = [frame(0x81, &vec![b'y'; 3 * BLOCK]), frame(0x81, b"after")].concat();
        let mut rest = &big[..];
        let mut r = FrameReader::new(1 << 22);
        let payloads = read_frames(&mut r, &mut rest, 2).await;
        assert_eq!(payloads[0].len(), 3 * BLOCK);
        assert_eq!(&payloads[1][..], b"after");
        while r.fill(&mut rest).await.unwrap() > 0 {}
        // The first block was kept and read into again; the large one is gone.
        assert_eq!((r.made, r.spare.len(), r.block), (2, 0, BLOCK));
    }

    #[tokio::test]
    async fn the_tap_stops_at_the_headers_and_keeps_the_rest() {
        let response = b"HTTP/1.1 101 OK\r\nA: b\r\n\r\n";
        let wire = [&response[..], &frame(0x81, b"hi")[..]].concat();
        let mut tap = Tap::new(&wire[..]);
        let mut head = Vec::new();
        let mut chunk = [0u8; 5];
        while tap.matched < 4 {
            let n = tap.read(&mut chunk).await.unwrap();
            head.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(head, response);
        let mut r = FrameReader::new(100);
        while r.fill(&mut tap).await.unwrap() > 0 {}
        assert_eq!(
            r.next_event().unwrap(),
            Some(Event::Message(Kind::Text, Bytes::from_static(b"hi")))
        );
    }
}
