//! JSON decoded on the workers into a flat tape: one `Vec` of nodes per message, strings left in
//! the payload (as ranges) unless they had escapes. Building Python objects from the tape is
//! then only object creation (under the GIL), with no second parse and no tree of maps and
//! strings allocated in between; native processors read fields from it without the GIL.

use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// One node of the tape, in document order. A container is followed by its items (for an
/// object: key, value, key, value...); `end` is the index just past its last descendant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    Float(f64),
    /// A string without escapes: `payload[start..start + len]`.
    Str {
        start: u32,
        len: u32,
    },
    /// A string that had escapes: `owned[index]`.
    Owned(u32),
    Array {
        len: u32,
        end: u32,
    },
    Object {
        len: u32,
        end: u32,
    },
}

/// A decoded JSON document.
#[derive(Debug, Clone)]
pub struct Json {
    payload: Bytes,
    nodes: Vec<Node>,
    owned: Vec<Box<str>>,
}

impl Drop for Json {
    fn drop(&mut self) {
        tapes::give_back(std::mem::take(&mut self.nodes));
    }
}

/// Tapes kept for the next parses. A document is usually dropped on another thread than the
/// worker that parsed it (the consuming thread, once it has built the Python objects), and
/// freeing there takes the lock of the worker's malloc arena, against the worker's own
/// allocations: on `json` (2 workers) nearly every time the consuming thread slept, it slept
/// on that lock (perf sched). Kept instead, a tape goes back to a worker for another parse.
/// Each thread keeps a few itself and trades them in runs with a shared store, one lock per
/// run; small tapes only, and at most 2 MiB of them shared, so that the memory kept stays
/// small.
mod tapes {
    use super::Node;
    use std::cell::RefCell;
    use std::sync::{Mutex, TryLockError};

    /// The largest tape kept, in nodes (8 KiB; a 2 KiB message of small fields needs ~256).
    const MAX_NODES: usize = 512;
    /// Tapes moved to or from the shared store at once.
    const RUN: usize = 32;
    /// Bytes of tape the shared store keeps (each thread keeps up to `2 * RUN` tapes more).
    /// By bytes, not by count: small messages' tapes (~300 bytes at 120 B) must cover what
    /// the queues hold in flight (up to thousands), or the consuming thread, giving them back
    /// faster than the workers take them in a burst, frees the excess into the workers'
    /// arenas after all.
    const SHARED_BYTES: usize = 2 << 20;

    /// The tapes, and the bytes they hold.
    static SHARED: Mutex<(Vec<Vec<Node>>, usize)> = Mutex::new((Vec::new(), 0));

    thread_local! {
        static KEPT: RefCell<Vec<Vec<Node>>> = const { RefCell::new(Vec::new()) };
    }

    fn bytes(tape: &Vec<Node>) -> usize {
        tape.capacity() * std::mem::size_of::<Node>()
    }

    /// The shared store, unless another thread has it: nobody waits for it (a tape is then
    /// allocated or freed instead). Waiting could also hang a child process forked while a
    /// worker held it.
    fn shared() -> Option<std::sync::MutexGuard<'static, (Vec<Vec<Node>>, usize)>> {
        match SHARED.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// An empty tape with room for `capacity` nodes: a kept one if there is one that is not
    /// far larger (a small message's document may live long, inside a Python result, and
    /// must not hold a large message's tape).
    pub(super) fn take(capacity: usize) -> Vec<Node> {
        let kept = KEPT
            .try_with(|kept| {
                let mut kept = kept.borrow_mut();
                if kept.is_empty() {
                    if let Some(mut shared) = shared() {
                        let (tapes, held) = &mut *shared;
                        let from = tapes.len().saturating_sub(RUN);
                        for tape in tapes.drain(from..) {
                            *held -= bytes(&tape);
                            kept.push(tape);
                        }
                    }
                }
                kept.pop()
            })
            .ok()
            .flatten();
        match kept {
            Some(tape) if tape.capacity() <= 4 * capacity.max(16) => {
                let mut tape = tape;
                tape.reserve(capacity);
                tape
            }
            _ => Vec::with_capacity(capacity),
        }
    }

    /// Keeps a tape whose document is gone, or frees it (too large, or enough kept).
    pub(super) fn give_back(mut tape: Vec<Node>) {
        if tape.capacity() == 0 || tape.capacity() > MAX_NODES {
            return;
        }
        tape.clear();
        // During the thread's exit (its own store already gone) the tape is just freed.
        let _ = KEPT.try_with(move |kept| {
            let mut kept = kept.borrow_mut();
            kept.push(tape);
            if kept.len() >= 2 * RUN {
                let Some(mut shared) = shared() else {
                    // Busy: the run is freed rather than waited for.
                    kept.truncate(RUN);
                    return;
                };
                let (tapes, held) = &mut *shared;
                for tape in kept.drain(RUN..) {
                    if *held + bytes(&tape) <= SHARED_BYTES {
                        *held += bytes(&tape);
                        tapes.push(tape);
                    }
                }
            }
        });
    }

    #[cfg(test)]
    pub(super) fn kept_here() -> usize {
        KEPT.with(|kept| kept.borrow().len())
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.to_value() == other.to_value()
    }
}

impl Json {
    /// Parses a payload (strict JSON, one document, nesting depth at most 128).
    pub fn parse(payload: &Bytes) -> Result<Json, serde_json::Error> {
        Json::parse_owned(payload.clone()).map_err(|(_, e)| e)
    }

    /// [`Json::parse`] taking the payload, and giving it back if it is not JSON. Saves a
    /// clone of the payload handle where the caller has no further use for it.
    pub fn parse_owned(payload: Bytes) -> Result<Json, (Bytes, serde_json::Error)> {
        let mut tape = Tape {
            // About one node per 8 bytes of typical messages: one allocation for most.
            nodes: tapes::take(payload.len() / 8 + 4),
            owned: Vec::new(),
            within: payload.as_ptr_range(),
        };
        let mut de = serde_json::Deserializer::from_slice(&payload);
        match Seed(&mut tape).deserialize(&mut de).and_then(|()| de.end()) {
            Ok(()) => Ok(Json {
                payload,
                nodes: tape.nodes,
                owned: tape.owned,
            }),
            Err(e) => Err((payload, e)),
        }
    }

    /// The payload it was parsed from, given back.
    pub fn into_payload(mut self) -> Bytes {
        std::mem::take(&mut self.payload)
    }

    /// The tape of a `serde_json::Value` (for tests and native callers).
    pub fn from_value(value: &serde_json::Value) -> Result<Json, serde_json::Error> {
        Json::parse(&Bytes::from(serde_json::to_vec(value)?))
    }

    /// The payload it was parsed from (its `Str` ranges are into it).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The nodes; the document's root is node 0.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The text of a `Str` or `Owned` node.
    pub fn str_at(&self, node: Node) -> Option<&str> {
        // A `Str` range was cut from a `&str` of this payload: valid UTF-8 at both ends.
        std::str::from_utf8(self.str_bytes_at(node)?).ok()
    }

    /// The UTF-8 bytes of a `Str` or `Owned` node, as they are: they were checked when parsed,
    /// so a caller that only compares or hands them on need not check them again.
    pub fn str_bytes_at(&self, node: Node) -> Option<&[u8]> {
        match node {
            Node::Owned(i) => self.owned.get(i as usize).map(|s| s.as_bytes()),
            node => leaf_str(&self.payload, node),
        }
    }

    /// The node at `index` if it can be read without the tape, from the payload alone (see
    /// [`leaf_str`], [`leaf_value`]): a scalar or a string without escapes.
    pub fn leaf(&self, index: usize) -> Option<Node> {
        match self.nodes[index] {
            Node::Owned(_) | Node::Array { .. } | Node::Object { .. } => None,
            leaf => Some(leaf),
        }
    }

    /// Whether a key node holds `name`.
    fn key_is(&self, node: Node, name: &str) -> bool {
        self.str_bytes_at(node) == Some(name.as_bytes())
    }

    /// Index just past the subtree that starts at `index`.
    pub fn skip(&self, index: usize) -> usize {
        match self.nodes[index] {
            Node::Array { end, .. } | Node::Object { end, .. } => end as usize,
            _ => index + 1,
        }
    }

    /// The node index of `name` in the object at `object` (the first occurrence), if any.
    pub fn field(&self, object: usize, name: &str) -> Option<usize> {
        let Node::Object { len, .. } = *self.nodes.get(object)? else {
            return None;
        };
        let mut at = object + 1;
        for _ in 0..len {
            let value = at + 1;
            if self.key_is(self.nodes[at], name) {
                return Some(value);
            }
            at = self.skip(value);
        }
        None
    }

    /// Follows a path of object fields from the root.
    pub fn path<'a>(&self, path: impl IntoIterator<Item = &'a str>) -> Option<usize> {
        path.into_iter()
            .try_fold(0, |node, name| self.field(node, name))
    }

    /// The node index of each path (`None`: absent, or not reached through objects).
    pub fn select(&self, paths: &[Vec<String>]) -> Vec<Option<usize>> {
        paths
            .iter()
            .map(|p| self.path(p.iter().map(String::as_str)))
            .collect()
    }

    /// The node at `index` as a `serde_json::Value` (for tests and native processors).
    pub fn value_at(&self, index: usize) -> serde_json::Value {
        use serde_json::Value;
        match self.nodes[index] {
            node @ Node::Owned(_) => {
                Value::String(self.str_at(node).unwrap_or_default().to_owned())
            }
            Node::Array { len, .. } => {
                let mut at = index + 1;
                let items = (0..len)
                    .map(|_| {
                        let v = self.value_at(at);
                        at = self.skip(at);
                        v
                    })
                    .collect();
                Value::Array(items)
            }
            Node::Object { len, .. } => {
                let mut at = index + 1;
                let mut map = serde_json::Map::new();
                for _ in 0..len {
                    let key = self.str_at(self.nodes[at]).unwrap_or_default().to_owned();
                    map.insert(key, self.value_at(at + 1));
                    at = self.skip(at + 1);
                }
                Value::Object(map)
            }
            leaf => leaf_value(&self.payload, leaf),
        }
    }

    /// The whole document as a `serde_json::Value`.
    pub fn to_value(&self) -> serde_json::Value {
        self.value_at(0)
    }
}

/// A tape being parsed: `within` is the payload's memory (strings inside it are ranges).
struct Tape {
    nodes: Vec<Node>,
    owned: Vec<Box<str>>,
    within: std::ops::Range<*const u8>,
}

/// Appends one value (and its descendants) to the tape.
struct Seed<'t>(&'t mut Tape);

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

fn count<E: serde::de::Error>(n: usize) -> Result<u32, E> {
    u32::try_from(n).map_err(|_| E::custom("JSON document too large"))
}

impl Seed<'_> {
    fn push_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        let tape = self.0;
        let (base, end) = (tape.within.start as usize, tape.within.end as usize);
        let at = s.as_ptr() as usize;
        let node = if at >= base && at + s.len() <= end {
            Node::Str {
                start: count(at - base)?,
                len: count(s.len())?,
            }
        } else {
            tape.owned.push(s.into());
            Node::Owned(count(tape.owned.len() - 1)?)
        };
        tape.nodes.push(node);
        Ok(())
    }

    /// Pushes a container placeholder; returns its index for [`Seed::close`].
    fn open(&mut self) -> usize {
        self.0.nodes.push(Node::Null);
        self.0.nodes.len() - 1
    }

    fn close<E: serde::de::Error>(self, at: usize, len: usize, object: bool) -> Result<(), E> {
        let (len, end) = (count(len)?, count(self.0.nodes.len())?);
        self.0.nodes[at] = if object {
            Node::Object { len, end }
        } else {
            Node::Array { len, end }
        };
        Ok(())
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.nodes.push(Node::Null);
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.nodes.push(Node::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.nodes.push(Node::Int(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0
            .nodes
            .push(i64::try_from(v).map_or(Node::UInt(v), Node::Int));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.nodes.push(Node::Float(v));
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.push_str(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let at = self.open();
        let mut len = 0;
        while seq.next_element_seed(Seed(self.0))?.is_some() {
            len += 1;
        }
        self.close(at, len, false)
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let at = self.open();
        let mut len = 0;
        while map.next_key_seed(Seed(self.0))?.is_some() {
            map.next_value_seed(Seed(self.0))?;
            len += 1;
        }
        self.close(at, len, true)
    }
}

/// The UTF-8 bytes of a `Str` node (a string without escapes), from the payload it was parsed
/// from; None for any other node.
pub fn leaf_str(payload: &[u8], node: Node) -> Option<&[u8]> {
    match node {
        Node::Str { start, len } => {
            let start = start as usize;
            payload.get(start..start + len as usize)
        }
        _ => None,
    }
}

/// A leaf node (see [`Json::leaf`]) as a `serde_json::Value`, its string read from `payload`;
/// null for any other node.
pub fn leaf_value(payload: &[u8], node: Node) -> serde_json::Value {
    use serde_json::Value;
    match node {
        Node::Bool(b) => Value::Bool(b),
        Node::Int(i) => Value::from(i),
        Node::UInt(u) => Value::from(u),
        Node::Float(f) => Value::from(f),
        Node::Str { .. } => {
            let text = leaf_str(payload, node).and_then(|b| std::str::from_utf8(b).ok());
            Value::String(text.unwrap_or_default().to_owned())
        }
        Node::Null | Node::Owned(_) | Node::Array { .. } | Node::Object { .. } => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Json {
        Json::parse(&Bytes::copy_from_slice(text.as_bytes())).expect("valid JSON")
    }

    #[test]
    fn round_trips_every_kind_of_value() {
        let text = r#"{"a":[1,-2,18446744073709551615,2.5,true,false,null],
                       "s":"plain","e":"tab\there \u00e9","n":{"x":{}},"z":[]}"#;
        let doc = parse(text);
        let expected: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(doc.to_value(), expected);
        // Strings without escapes stay in the payload; escaped ones are owned.
        let s = doc.path(["s"]).expect("s");
        assert!(matches!(doc.nodes()[s], Node::Str { .. }));
        let e = doc.path(["e"]).expect("e");
        assert_eq!(doc.str_at(doc.nodes()[e]), Some("tab\there é"));
        assert!(matches!(doc.nodes()[e], Node::Owned(0)));
    }

    #[test]
    fn tapes_are_kept_for_the_next_parse_and_large_ones_are_not() {
        let small = r#"{"seq":1,"v":[1,2,3],"s":"x"}"#;
        let doc = parse(small);
        let tape = doc.nodes().as_ptr();
        let before = tapes::kept_here();
        drop(doc);
        assert_eq!(tapes::kept_here(), before + 1);
        // The next parse on this thread reads into the same memory.
        let again = parse(small);
        assert_eq!(again.nodes().as_ptr(), tape);
        assert_eq!(tapes::kept_here(), before);
        assert_eq!(again.to_value(), parse(small).to_value());
        // A tape of more than 512 nodes is freed, not kept.
        let big = format!("[{}]", vec!["1"; 2000].join(","));
        drop(parse(&big));
        assert_eq!(tapes::kept_here(), before);
        // One of 300 nodes is kept, but a small document does not take it: it may live long.
        let medium = parse(&format!("[{}]", vec!["1"; 300].join(",")));
        let medium_tape = medium.nodes().as_ptr();
        drop(medium);
        let small_doc = parse(small);
        assert_ne!(small_doc.nodes().as_ptr(), medium_tape);
        assert!(small_doc.nodes().len() < 16);
        drop(small_doc);
        // A thread keeps at most 2 x 32: past that, a run goes to the shared store.
        let many: Vec<Json> = (0..100).map(|_| parse(small)).collect();
        drop(many);
        let kept = tapes::kept_here();
        assert!((32..64).contains(&kept), "{kept}");
        // into_payload gives the payload back, and the tape is kept all the same.
        let payload = parse(small).into_payload();
        assert_eq!(payload.as_ref(), small.as_bytes());
        assert_eq!(tapes::kept_here(), kept);
    }

    #[test]
    fn a_parse_that_takes_the_payload_gives_it_back() {
        let payload = Bytes::from_static(br#"{"s":"in place","e":"\u00e9","n":[1]}"#);
        let doc = Json::parse_owned(payload.clone()).expect("valid JSON");
        let s = doc.path(["s"]).expect("s");
        // A string without escapes is a leaf: readable from the payload alone.
        let leaf = doc.leaf(s).expect("a leaf");
        assert_eq!(leaf_str(&payload, leaf), Some(&b"in place"[..]));
        assert_eq!(leaf_value(&payload, leaf), json!("in place"));
        assert_eq!(
            doc.leaf(doc.path(["e"]).expect("e")),
            None,
            "escaped: owned"
        );
        assert_eq!(doc.leaf(doc.path(["n"]).expect("n")), None, "a container");
        assert_eq!(
            doc.into_payload().as_ptr(),
            payload.as_ptr(),
            "the same bytes"
        );
        let bad = Bytes::from_static(b"{not json");
        let (back, e) = Json::parse_owned(bad.clone()).expect_err("not JSON");
        assert_eq!((back.as_ptr(), back.len()), (bad.as_ptr(), bad.len()));
        assert!(e.to_string().contains("key must be a string"), "{e}");
    }

    #[test]
    fn fields_are_found_past_nested_values() {
        let doc = parse(r#"{"skip":{"seq":99,"deep":[{"seq":98}]},"seq":7,"px":{"bid":1.5}}"#);
        let seq = doc.path(["seq"]).expect("seq");
        assert_eq!(doc.nodes()[seq], Node::Int(7));
        let bid = doc.path(["px", "bid"]).expect("px.bid");
        assert_eq!(doc.value_at(bid), json!(1.5));
        assert_eq!(doc.path(["missing"]), None);
        assert_eq!(doc.path(["seq", "x"]), None, "not an object");
        assert_eq!(doc.skip(0), doc.nodes().len());
        let paths = [
            vec!["seq".to_string()],
            vec!["px".into(), "bid".into()],
            vec!["no".into()],
        ];
        assert_eq!(doc.select(&paths), vec![Some(seq), Some(bid), None]);
    }

    #[test]
    fn refuses_what_is_not_one_json_document() {
        for bad in ["{", "[1,]", "{\"a\":1} x", "", "nul", "\"\\ud800\""] {
            let payload = Bytes::copy_from_slice(bad.as_bytes());
            assert!(Json::parse(&payload).is_err(), "{bad:?}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        let payload = Bytes::from(deep);
        assert!(Json::parse(&payload).is_err(), "nesting is limited");
    }
}
