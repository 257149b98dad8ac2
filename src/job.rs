//! Jobs (one per received message) and the native decode stage that runs on the workers.

use bytes::Bytes;

/// The frame type a message arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Binary => "binary",
        }
    }
}

/// One received message, as the read loop hands it to the pool.
#[derive(Debug, Clone)]
pub struct Job {
    /// 0, 1, 2, ... in receipt order, per stream.
    pub id: u64,
    pub kind: Kind,
    /// The payload as received (no copy: it shares the frame buffer).
    pub payload: Bytes,
    /// Seconds since the Unix epoch at receipt.
    pub received_at: f64,
    /// Which connection of the stream delivered it.
    pub connection: u32,
}

impl Job {
    /// The same job with an empty payload.
    pub fn without_payload(&self) -> Job {
        Job {
            payload: Bytes::new(),
            ..*self
        }
    }
}

/// How the workers decode payloads before the handler sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    Bytes,
    Text,
    Json,
}

impl std::str::FromStr for DecodeMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bytes" => Ok(DecodeMode::Bytes),
            "text" => Ok(DecodeMode::Text),
            "json" => Ok(DecodeMode::Json),
            other => Err(format!(
                "decode must be \"bytes\", \"text\" or \"json\", not {other:?}"
            )),
        }
    }
}

/// A payload after decoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Bytes(Bytes),
    Text(String),
    Json(crate::json::Json),
}

/// Why a payload did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub message: String,
}

/// Decodes a payload. Text frames are valid UTF-8 already (the protocol layer checks), so only
/// binary frames asked to become text are checked here.
pub fn decode(kind: Kind, payload: &Bytes, mode: DecodeMode) -> Result<Data, DecodeError> {
    match mode {
        DecodeMode::Bytes => Ok(Data::Bytes(payload.clone())),
        DecodeMode::Text => match std::str::from_utf8(payload) {
            Ok(s) => Ok(Data::Text(s.to_owned())),
            Err(e) => Err(DecodeError {
                message: format!("{} payload is not valid UTF-8: {e}", kind.as_str()),
            }),
        },
        DecodeMode::Json => crate::json::Json::parse(payload)
            .map(Data::Json)
            .map_err(|e| DecodeError {
                message: format!("payload is not valid JSON: {e}"),
            }),
    }
}

/// The key of a message for `key=`: the value of one top-level field of a JSON object, as
/// text (a string's content; any other value's compact JSON). None when the payload is not a
/// JSON object or lacks the field. Only that field's value is built; the rest is skipped.
pub fn extract_key(payload: &[u8], field: &str) -> Option<Box<str>> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Field<'a>(&'a str);

    impl<'de> Visitor<'de> for Field<'_> {
        type Value = Option<serde_json::Value>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if found.is_none() && name == self.0 {
                    found = Some(map.next_value::<serde_json::Value>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }

    let mut de = serde_json::Deserializer::from_slice(payload);
    let value = de.deserialize_map(Field(field)).ok()??;
    Some(match value {
        serde_json::Value::String(s) => s.into_boxed_str(),
        other => other.to_string().into_boxed_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_a_top_level_key() {
        let key = |p: &[u8]| extract_key(p, "sym").map(String::from);
        assert_eq!(
            key(br#"{"px": {"sym": "no"}, "sym": "BTC"}"#),
            Some("BTC".into())
        );
        assert_eq!(key(br#"{"sym": 7, "x": [1, {"a": 2}]}"#), Some("7".into()));
        assert_eq!(key(br#"{"s\u0079m": "esc"}"#), Some("esc".into()));
        assert_eq!(key(br#"{"other": 1}"#), None);
        assert_eq!(key(br#"[1, 2]"#), None);
        assert_eq!(key(b"not json"), None);
        assert_eq!(key(br#"{"sym": "A", "#), None);
    }

    #[test]
    fn decodes_each_mode() {
        let p = Bytes::from_static(br#"{"seq": 1, "price": 2.5}"#);
        assert_eq!(
            decode(Kind::Text, &p, DecodeMode::Bytes),
            Ok(Data::Bytes(p.clone()))
        );
        assert_eq!(
            decode(Kind::Text, &p, DecodeMode::Text),
            Ok(Data::Text(r#"{"seq": 1, "price": 2.5}"#.into()))
        );
        assert_eq!(
            decode(Kind::Text, &p, DecodeMode::Json),
            Ok(Data::Json(
                crate::json::Json::from_value(&serde_json::json!({"seq": 1, "price": 2.5}))
                    .expect("json")
            ))
        );
    }

    #[test]
    fn reports_bad_payloads() {
        let bad = Bytes::from_static(b"\xff\xfe");
        let e = decode(Kind::Binary, &bad, DecodeMode::Text).unwrap_err();
        assert!(
            e.message.starts_with("binary payload is not valid UTF-8"),
            "{}",
            e.message
        );
        let e = decode(
            Kind::Text,
            &Bytes::from_static(b"{\"a\":"),
            DecodeMode::Json,
        )
        .unwrap_err();
        assert!(
            e.message.starts_with("payload is not valid JSON"),
            "{}",
            e.message
        );
    }

    #[test]
    fn parses_modes() {
        assert_eq!("json".parse::<DecodeMode>(), Ok(DecodeMode::Json));
        assert!("xml".parse::<DecodeMode>().unwrap_err().contains("\"xml\""));
    }
}
