use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};

use crate::CodecError;

/// A user value (run input, step output) encoded as MessagePack.
///
/// Payloads travel opaque through the coordinator: only the step handlers decode
/// them into their own types. In binary formats a payload is a byte string; in
/// human-readable formats (JSON) it is transcoded to the value it holds, so a
/// report printed as JSON shows outputs as JSON.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payload(Bytes);

/// MessagePack's `nil`: the encoding of `()` and `None`.
const NIL: &[u8] = &[0xc0];

/// Bytes as a payload keeps them (a parked run keeps its input and outputs):
/// `nil`, what a step that returns `()` gives, shared rather than allocated,
/// the rest in one allocation of its size (from a `Vec` with room to spare,
/// `Bytes` allocates a second block to track it).
fn held(v: Vec<u8>) -> Bytes {
    if v == NIL { Bytes::from_static(NIL) } else { Bytes::from(v.into_boxed_slice()) }
}

impl Payload {
    /// Encodes `value` as MessagePack with named struct fields.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, CodecError> {
        rmp_serde::to_vec_named(value)
            .map(|v| Payload(held(v)))
            .map_err(|source| CodecError::Encode { kind: "payload", source })
    }

    /// Decodes the payload into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        crate::codec::from_slice(&self.0).map_err(|source| CodecError::Malformed {
            expected: "payload",
            source: readable(source),
        })
    }

    /// The payload held in a MessagePack `bin` as read off the wire (as
    /// serde reads it: `nil` shared, the rest copied).
    pub(crate) fn from_bin(bytes: &[u8]) -> Self {
        Payload(if bytes == NIL { Bytes::from_static(NIL) } else { Bytes::copy_from_slice(bytes) })
    }

    /// The payload of `()`: MessagePack `nil`.
    pub fn nil() -> Self {
        Payload(Bytes::from_static(NIL))
    }

    /// True when the payload is `nil` (a step that returned `()`).
    pub fn is_nil(&self) -> bool {
        self.0.as_ref() == NIL
    }

    /// Wraps bytes that are already MessagePack. They are not validated here;
    /// [`Payload::decode`] reports bad bytes.
    pub fn from_msgpack(bytes: impl Into<Bytes>) -> Self {
        Payload(bytes.into())
    }

    /// Checks that the bytes are exactly one well-formed MessagePack value:
    /// what the coordinator asks of every input and output before keeping it.
    pub fn validate(&self) -> Result<(), CodecError> {
        let mut rest: &[u8] = &self.0;
        let mut de = rmp_serde::Deserializer::new(&mut rest);
        de.set_max_depth(crate::codec::MAX_DEPTH);
        serde::de::IgnoredAny::deserialize(&mut de)
            .map_err(|source| CodecError::Malformed { expected: "payload", source })?;
        if !rest.is_empty() {
            return Err(CodecError::Malformed {
                expected: "payload",
                source: rmp_serde::decode::Error::Syntax(format!(
                    "{} bytes after the MessagePack value",
                    rest.len()
                )),
            });
        }
        Ok(())
    }

    /// The raw MessagePack bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Number of encoded bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no bytes at all (not even `nil`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Transcodes a value from any self-describing format (e.g. JSON) into a payload.
    pub fn transcode_from<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, CodecError> {
        let mut buf = Vec::new();
        let mut ser = rmp_serde::Serializer::new(&mut buf).with_struct_map();
        serde_transcode::transcode(deserializer, &mut ser)
            .map_err(|source| CodecError::Encode { kind: "payload", source })?;
        Ok(Payload(Bytes::from(buf)))
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::nil()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            let mut de = rmp_serde::Deserializer::from_read_ref(self.0.as_ref());
            serde_transcode::transcode(&mut de, serializer)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let mut buf = Vec::new();
            let mut ser = rmp_serde::Serializer::new(&mut buf).with_struct_map();
            serde_transcode::transcode(deserializer, &mut ser).map_err(serde::de::Error::custom)?;
            Ok(Payload(held(buf)))
        } else {
            // Only a byte string: a MessagePack `str` or array is refused rather
            // than read as bytes (which would turn `"ok"` into the number 111).
            deserializer.deserialize_bytes(BinVisitor).map(Payload)
        }
    }
}

struct BinVisitor;

impl serde::de::Visitor<'_> for BinVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a MessagePack `bin` holding the encoded value")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Payload::from_bin(v).0)
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(held(v))
    }
}

/// A value of the wrong kind said in the words of the JSON a caller typed
/// (rmp says `wrong msgpack marker FixStr(4)`).
fn readable(e: rmp_serde::decode::Error) -> rmp_serde::decode::Error {
    use rmp::Marker as M;
    let rmp_serde::decode::Error::TypeMismatch(marker) = e else { return e };
    let found = match marker {
        M::FixStr(_) | M::Str8 | M::Str16 | M::Str32 => "a string",
        M::FixPos(_) | M::FixNeg(_) | M::U8 | M::U16 | M::U32 | M::U64 => "an integer",
        M::I8 | M::I16 | M::I32 | M::I64 => "an integer",
        M::F32 | M::F64 => "a number with a fraction",
        M::True | M::False => "a boolean",
        M::Null => "null",
        M::FixArray(_) | M::Array16 | M::Array32 => "an array",
        M::FixMap(_) | M::Map16 | M::Map32 => "an object",
        M::Bin8 | M::Bin16 | M::Bin32 => "bytes",
        _ => return rmp_serde::decode::Error::TypeMismatch(marker),
    };
    rmp_serde::decode::Error::Syntax(format!(
        "found {found} where the type wants another kind of value"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Order {
        order_id: String,
        amount: u64,
    }

    #[test]
    fn a_value_of_the_wrong_kind_is_named_in_plain_words() {
        let p = Payload::encode(&serde_json::json!({"order_id": "o", "amount": "five"})).unwrap();
        let e = p.decode::<Order>().unwrap_err().to_string();
        assert!(e.contains("found a string where the type wants another kind of value"), "{e}");
        let e = Payload::encode(&[1, 2]).unwrap().decode::<u32>().unwrap_err().to_string();
        assert!(e.contains("found an array"), "{e}");
    }

    #[test]
    fn typed_round_trip() {
        let order = Order { order_id: "order_1".into(), amount: 50 };
        let p = Payload::encode(&order).unwrap();
        assert_eq!(p.decode::<Order>().unwrap(), order);
    }

    #[test]
    fn unit_is_nil() {
        assert!(Payload::encode(&()).unwrap().is_nil());
        assert!(Payload::nil().is_nil());
    }

    #[test]
    fn json_shows_the_value_and_reads_it_back() {
        let p = Payload::encode(&Order { order_id: "o".into(), amount: 7 }).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"order_id":"o","amount":7}"#);
        let back: Payload = serde_json::from_str(&json).unwrap();
        assert_eq!(back.decode::<Order>().unwrap().amount, 7);
    }

    #[test]
    fn only_bin_is_a_payload_and_validate_checks_the_bytes() {
        #[derive(Serialize)]
        struct Wire<'a> {
            output: &'a str,
        }
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Read {
            output: Payload,
        }
        let as_str = rmp_serde::to_vec_named(&Wire { output: "ok" }).unwrap();
        assert!(rmp_serde::from_slice::<Read>(&as_str).is_err());
        assert!(Payload::encode(&"ok").unwrap().validate().is_ok());
        assert!(Payload::from_msgpack(vec![0xc1]).validate().is_err());
        assert!(Payload::from_msgpack(vec![0x92, 0x01]).validate().is_err());
        assert!(Payload::from_msgpack(vec![0x01, 0x02]).validate().is_err());
        assert!(Payload::from_msgpack(Vec::new()).validate().is_err());
    }

    #[test]
    fn decoding_into_the_wrong_type_is_an_error() {
        let p = Payload::encode(&"text").unwrap();
        assert!(matches!(p.decode::<Order>(), Err(CodecError::Malformed { .. })));
        assert!(Payload::from_msgpack(vec![0xc1]).decode::<Order>().is_err());
    }
}
