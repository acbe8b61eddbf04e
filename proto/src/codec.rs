use std::borrow::Cow;

use serde::{Deserialize, Serialize, de::DeserializeOwned, de::IgnoredAny};

/// The protocol version this build speaks. A message with another version is
/// rejected with [`CodecError::UnsupportedVersion`]; within one version, fields
/// are only ever added, and unknown fields are ignored.
pub const PROTOCOL_VERSION: u16 = 2;

/// Messages above this size are rejected before decoding (NATS' default `max_payload`).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A message that travels in an envelope: the kind names it on the wire, so a
/// message sent to the wrong subject is told apart from a malformed one.
pub trait Message: Serialize + DeserializeOwned {
    /// Short stable name of the message kind, e.g. `"step.command"`.
    const KIND: &'static str;

    /// Reads the whole envelope in the layout [`encode`] writes, faster than
    /// serde, for the messages of every step; `None` (the default) when it
    /// cannot be sure, and [`decode_with_limit`] then uses serde.
    #[doc(hidden)]
    fn decode_fast(_bytes: &[u8]) -> Option<Self> {
        None
    }

    /// Writes the whole envelope, byte for byte as [`encode`] would through
    /// serde, faster; `None` (the default) and [`encode`] uses serde.
    #[doc(hidden)]
    fn encode_fast(&self, _buf: &mut Vec<u8>) -> Option<()> {
        None
    }
}

/// Errors from encoding or decoding wire messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The message is larger than the receiver accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the message that was received.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The message was written by a peer speaking another protocol version.
    #[error("unsupported protocol version {found} (this build speaks version {supported})")]
    UnsupportedVersion {
        /// Version found in the envelope.
        found: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// A well-formed message of another kind arrived.
    #[error("expected a `{expected}` message, got `{found}`")]
    WrongKind {
        /// The kind the receiver expected.
        expected: &'static str,
        /// The kind found in the envelope.
        found: String,
    },
    /// The bytes are not a valid message of the expected kind.
    #[error("malformed `{expected}` message: {source}")]
    Malformed {
        /// The kind the receiver expected.
        expected: &'static str,
        /// What the MessagePack decoder reported.
        #[source]
        source: rmp_serde::decode::Error,
    },
    /// A value could not be encoded.
    #[error("cannot encode {kind}: {source}")]
    Encode {
        /// What was being encoded.
        kind: &'static str,
        /// What the MessagePack encoder reported.
        #[source]
        source: rmp_serde::encode::Error,
    },
}

#[derive(Serialize)]
pub(crate) struct EnvelopeOut<'a, M> {
    v: u16,
    kind: &'a str,
    body: &'a M,
}

impl<'a, M: Message> EnvelopeOut<'a, M> {
    /// The envelope of `msg` in this protocol version.
    pub(crate) fn of(msg: &'a M) -> Self {
        EnvelopeOut { v: PROTOCOL_VERSION, kind: M::KIND, body: msg }
    }
}

#[derive(Deserialize)]
struct EnvelopeIn<'a, M> {
    v: u16,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    body: M,
}

/// Envelope with the body skipped: enough to tell a version or kind mismatch.
#[derive(Deserialize)]
struct Header<'a> {
    v: u16,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    #[allow(dead_code)]
    body: IgnoredAny,
}

/// The ids a command, ack, heartbeat or outcome carries, read from a message
/// whose body does not decode as a whole: enough to answer about it (a bad
/// output fails its attempt rather than vanishing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageIds {
    /// The command.
    #[serde(with = "crate::uuid_text", alias = "command_id")]
    pub command_id: uuid::Uuid,
    /// Its run.
    #[serde(with = "crate::uuid_text", alias = "run_id")]
    pub run_id: uuid::Uuid,
    /// Its attempt, when present.
    #[serde(default)]
    pub attempt: u32,
    /// Execute or compensate, when present.
    #[serde(default)]
    pub kind: Option<crate::CommandKind>,
}

/// Reads only the ids of a message of kind `kind`, under `limit` bytes, in
/// any protocol version (v1's snake_case keys and binary ids too): a peer
/// speaking another version is then answered about its command, rather than
/// left to time out.
pub fn decode_ids(bytes: &[u8], kind: &'static str, limit: usize) -> Option<MessageIds> {
    if bytes.len() > limit {
        return None;
    }
    let env = from_slice::<EnvelopeIn<'_, MessageIds>>(bytes).ok()?;
    (env.kind == kind).then_some(env.body)
}

/// Encodes a message in its versioned envelope.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, CodecError> {
    // Most messages fit in 256 bytes: start there rather than growing from empty.
    let mut buf = Vec::with_capacity(256);
    if msg.encode_fast(&mut buf).is_some() {
        return Ok(buf);
    }
    buf.clear();
    rmp_serde::encode::write_named(&mut buf, &EnvelopeOut::of(msg))
        .map_err(|source| CodecError::Encode { kind: M::KIND, source })?;
    Ok(buf)
}

/// Decodes a message, rejecting anything larger than [`DEFAULT_MAX_MESSAGE_BYTES`].
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, CodecError> {
    decode_with_limit(bytes, DEFAULT_MAX_MESSAGE_BYTES)
}

/// Decodes a message, rejecting anything larger than `limit` bytes.
///
/// Never panics: garbage, truncated input, a future version or another kind of
/// message each come back as a [`CodecError`].
pub fn decode_with_limit<M: Message>(bytes: &[u8], limit: usize) -> Result<M, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge { size: bytes.len(), limit });
    }
    if let Some(msg) = M::decode_fast(bytes) {
        return Ok(msg);
    }
    decode_serde(bytes)
}

/// Deepest nesting of arrays and maps a message or payload may have (as
/// `serde_json`'s default). MessagePack's decoder allows 1,024 levels, and
/// each costs stack frames: in a debug build a few hundred levels of
/// `[[[[…` overflowed a thread's stack before the decoder's own limit
/// refused them. Orchestrix's own messages nest a few levels deep.
pub const MAX_DEPTH: usize = 128;

/// `rmp_serde::from_slice`, refusing values nested over [`MAX_DEPTH`].
pub fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

/// [`decode_with_limit`] through serde alone.
pub(crate) fn decode_serde<M: Message>(bytes: &[u8]) -> Result<M, CodecError> {
    match from_slice::<EnvelopeIn<'_, M>>(bytes) {
        Ok(env) => check_header(env.v, &env.kind, M::KIND).map(|()| env.body),
        Err(source) => {
            // Tell a version or kind mismatch apart from plain garbage.
            if let Ok(h) = from_slice::<Header<'_>>(bytes) {
                check_header(h.v, &h.kind, M::KIND)?;
            }
            Err(CodecError::Malformed { expected: M::KIND, source })
        }
    }
}

/// Reads the version and kind of an envelope without decoding its body, so a
/// receiver picks the right decoder with one pass over the message.
pub fn peek_kind(bytes: &[u8]) -> Result<(u16, String), CodecError> {
    if let Some((v, kind)) = peek_fast(bytes) {
        return Ok((v, kind.to_owned()));
    }
    // Another encoder may order the fields differently: read the header properly.
    from_slice::<Header<'_>>(bytes)
        .map(|h| (h.v, h.kind.into_owned()))
        .map_err(|source| CodecError::Malformed { expected: "envelope", source })
}

/// The envelope as [`encode`] writes it: a map whose first entries are `v`
/// and `kind`. Reads those two and stops; `None` for any other layout.
fn peek_fast(bytes: &[u8]) -> Option<(u16, &str)> {
    let mut rd = bytes;
    if rmp::decode::read_map_len(&mut rd).ok()? < 2 {
        return None;
    }
    let (key, rest) = rmp::decode::read_str_from_slice(rd).ok()?;
    if key != "v" {
        return None;
    }
    let mut rd = rest;
    let v: u16 = rmp::decode::read_int(&mut rd).ok()?;
    let (key, rest) = rmp::decode::read_str_from_slice(rd).ok()?;
    if key != "kind" {
        return None;
    }
    let (kind, _) = rmp::decode::read_str_from_slice(rest).ok()?;
    Some((v, kind))
}

fn check_header(v: u16, kind: &str, expected: &'static str) -> Result<(), CodecError> {
    if v != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion { found: v, supported: PROTOCOL_VERSION });
    }
    if kind != expected {
        return Err(CodecError::WrongKind { expected, found: kind.to_owned() });
    }
    Ok(())
}
