//! Typed ids: a run id and a command id are both UUIDs, but one cannot be
//! passed where the other is meant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Text that is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a {what}: expected a UUID such as 0190a5e4-7b1c-7d2e-8f00-1a2b3c4d5e6f")]
pub struct IdError {
    /// What was expected (`run id`, `command id`).
    pub what: &'static str,
    /// The text given.
    pub input: String,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        ///
        /// Shown and parsed in the hyphenated form
        /// (`0190a5e4-7b1c-7d2e-8f00-1a2b3c4d5e6f`); on the wire, the
        /// UUID's 16 bytes.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(#[serde(with = "uuid_text")] Uuid);

        impl $name {
            /// A new id, ordered by creation time (UUIDv7).
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id as a UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            /// A new id (see [`Self::new`]).
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        impl PartialEq<Uuid> for $name {
            fn eq(&self, other: &Uuid) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for Uuid {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s.trim())
                    .map(Self)
                    .map_err(|_| IdError { what: $what, input: s.to_owned() })
            }
        }
    };
}

id_type!(
    /// The id of one run of a flow.
    RunId,
    "run id"
);

id_type!(
    /// The id of one command sent for a step attempt (an attempt sent again
    /// because nobody took it gets a new one).
    CommandId,
    "command id"
);

/// Ids on the wire (protocol v2): a MessagePack or JSON **string**, the
/// lowercase hyphenated UUID, whatever the format, so that every language
/// reads them as it reads any other text. Decoding also takes the 16-byte
/// binary form, which records stored before v2 hold.
pub mod uuid_text {
    use std::fmt;

    use serde::{Deserializer, Serializer, de};
    use uuid::Uuid;

    /// Writes the id as its 36-character text.
    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        s.serialize_str(id.hyphenated().encode_lower(&mut buf))
    }

    /// Reads the text form (any case), or 16 raw bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        d.deserialize_any(IdVisitor)
    }

    pub(crate) struct IdVisitor;

    impl de::Visitor<'_> for IdVisitor {
        type Value = Uuid;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a UUID as text, such as \"0190a5e4-7b1c-7d2e-8f00-1a2b3c4d5e6f\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Uuid, E> {
            Uuid::parse_str(v).map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Uuid, E> {
            Uuid::from_slice(v).map_err(|_| E::invalid_length(v.len(), &self))
        }
    }

    /// The same for an optional id (`nil` or absent: none).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use uuid::Uuid;

        /// Writes `nil` or the id's text.
        pub fn serialize<S: Serializer>(id: &Option<Uuid>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => super::serialize(id, s),
                None => s.serialize_none(),
            }
        }

        /// Reads `nil`, or an id as [`super::deserialize`] does.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
            #[derive(Deserialize)]
            struct Id(#[serde(with = "super")] Uuid);
            Ok(Option::<Id>::deserialize(d)?.map(|id| id.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_bad_text_says_what_was_expected() {
        let id = RunId::new();
        assert_eq!(id.to_string().parse::<RunId>(), Ok(id));
        let err = "42".parse::<RunId>().unwrap_err();
        assert!(err.to_string().starts_with("`42` is not a run id"), "{err}");
        let err = "x".parse::<CommandId>().unwrap_err();
        assert!(err.to_string().contains("command id"), "{err}");
    }

    #[test]
    fn the_wire_form_is_text_and_the_old_binary_form_still_reads() {
        let uuid = Uuid::now_v7();
        let id = RunId::from(uuid);
        assert_eq!(rmp_serde::to_vec(&id).unwrap(), rmp_serde::to_vec(&uuid.to_string()).unwrap());
        let old = rmp_serde::to_vec(&serde_bytes_of(&uuid)).unwrap();
        assert_eq!(rmp_serde::from_slice::<RunId>(&old).unwrap(), id);
        let upper = rmp_serde::to_vec(&uuid.to_string().to_uppercase()).unwrap();
        assert_eq!(rmp_serde::from_slice::<RunId>(&upper).unwrap(), id);
        assert!(rmp_serde::from_slice::<RunId>(&rmp_serde::to_vec("42").unwrap()).is_err());
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{uuid}\""));
        assert_eq!(id, uuid);
        assert_eq!(format!("{id:?}"), format!("RunId({uuid})"));
    }

    fn serde_bytes_of(uuid: &Uuid) -> impl Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl Serialize for B<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(uuid.as_bytes())
    }
}
