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
        pub struct $name(Uuid);

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
    fn the_wire_form_is_the_uuid_s() {
        let uuid = Uuid::now_v7();
        let id = RunId::from(uuid);
        assert_eq!(rmp_serde::to_vec(&id).unwrap(), rmp_serde::to_vec(&uuid).unwrap());
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{uuid}\""));
        assert_eq!(id, uuid);
        assert_eq!(format!("{id:?}"), format!("RunId({uuid})"));
    }
}
