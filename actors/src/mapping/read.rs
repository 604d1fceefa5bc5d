//! An event read for mapping: only the members the columns come from are kept, strings
//! borrowed from the text where they have no escapes; everything else is parsed to check it
//! and dropped. Building the whole event as a `serde_json::Value` tree and dropping it again
//! took a sixth of a v2 backfill's CPU.
//!
//! It accepts and refuses exactly the texts a `Value` parse does, with the same error (the
//! same parser reads every value, skipped ones too, numbers and escapes checked alike), and
//! reads what a lookup in that tree would: a member given twice is its last, a member of
//! something that is not an object is absent. (One exception, by design: a member named by
//! serde_json's private raw-value token is a member like any other in the objects read here
//! and in skipped values, where the tree would parse its string as the object's whole text;
//! values kept as trees, v1's `metadata` and object-valued columns, still follow the tree's
//! rule. Only valid JSON is accepted either way.) The tests compare both on every kind of
//! text, so a serde_json feature that changed how values arrive (`arbitrary_precision`
//! sends numbers as maps) would fail them.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::event::ApiVersion;

/// One member's value as the mapping needs it.
#[derive(Debug)]
pub(super) enum Scalar<'a> {
    Null,
    Text(Cow<'a, str>),
    /// A boolean, number, object or array, as the tree holds it (its text is its compact
    /// JSON, which is what a column stores).
    Other(Value),
}

impl Scalar<'_> {
    /// Strings as given, other values as compact JSON, null as `None`.
    pub(super) fn into_text(self) -> Option<String> {
        match self {
            Scalar::Null => None,
            Scalar::Text(text) => Some(text.into_owned()),
            Scalar::Other(value) => Some(value.to_string()),
        }
    }
}

/// The members of the event's objects that become columns.
pub(super) const ACTOR: &[&str] = &[
    "email",
    "type",
    "ip",
    "ip_address",
    "id",
    "context",
    "token_id",
    "token_name",
];
pub(super) const ACTION: &[&str] = &["type", "result", "description", "time"];
pub(super) const RESOURCE: &[&str] = &["type", "id", "product", "scope"];
pub(super) const ZONE: &[&str] = &["id", "name"];
pub(super) const RAW: &[&str] = &["method", "uri", "status_code", "cf_ray_id", "user_agent"];

/// The wanted members of one object, by their place in its list above.
#[derive(Debug, Default)]
pub(super) struct Members<'a> {
    names: &'static [&'static str],
    values: [Option<Scalar<'a>>; 8],
}

impl<'a> Members<'a> {
    /// The member `name` (one of the list's), taken out.
    pub(super) fn take(&mut self, name: &str) -> Option<Scalar<'a>> {
        let at = self.names.iter().position(|n| *n == name)?;
        self.values[at].take()
    }

    /// The member `name` as text ([`Scalar::into_text`]).
    pub(super) fn text(&mut self, name: &str) -> Option<String> {
        self.take(name).and_then(Scalar::into_text)
    }
}

/// The event: its members that become columns.
#[derive(Debug, Default)]
pub(super) struct Event<'a> {
    pub id: Option<Scalar<'a>>,
    pub when: Option<Scalar<'a>>,
    /// v1 only: kept whole, its stored text is the tree's (keys sorted, the last of a key).
    pub metadata: Option<Value>,
    pub actor: Members<'a>,
    pub action: Members<'a>,
    pub resource: Members<'a>,
    pub zone: Members<'a>,
    pub raw: Members<'a>,
}

/// Reads `text` (one JSON value) as an event of `version`: `Ok(Err(kind))` when it is valid
/// JSON but not an object.
pub(super) fn event(
    version: ApiVersion,
    text: &str,
) -> Result<Result<Event<'_>, &'static str>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let event = TopSeed(version).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(event)
}

struct TopSeed(ApiVersion);

impl<'de> DeserializeSeed<'de> for TopSeed {
    type Value = Result<Event<'de>, &'static str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// What each kind of JSON value is called in a rejection ("… is a number instead of a string").
const NULL: &str = "null";
const BOOLEAN: &str = "a boolean";
const NUMBER: &str = "a number";
const STRING: &str = "a string";
const ARRAY: &str = "an array";
const OBJECT: &str = "an object";

/// What `value` is called in a rejection.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => NULL,
        Value::Bool(_) => BOOLEAN,
        Value::Number(_) => NUMBER,
        Value::String(_) => STRING,
        Value::Array(_) => ARRAY,
        Value::Object(_) => OBJECT,
    }
}

/// The visitor methods for every value but an object, each answering `self.not_object(kind)`
/// with what the value is called in a rejection (an array is read to its end first).
macro_rules! not_an_object {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(self.not_object(BOOLEAN))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(self.not_object(NUMBER))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(self.not_object(NUMBER))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(self.not_object(NUMBER))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(self.not_object(STRING))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(self.not_object(NULL))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<Checked>()?.is_some() {}
            Ok(self.not_object(ARRAY))
        }
    };
}

impl TopSeed {
    fn not_object<'de>(&self, kind: &'static str) -> Result<Event<'de>, &'static str> {
        Err(kind)
    }
}

impl<'de> Visitor<'de> for TopSeed {
    type Value = Result<Event<'de>, &'static str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    not_an_object!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut event = Event::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.0.as_ref() {
                "id" => event.id = Some(map.next_value()?),
                "when" => event.when = Some(map.next_value()?),
                "metadata" if self.0 == ApiVersion::V1 => event.metadata = Some(map.next_value()?),
                "actor" => event.actor = map.next_value_seed(MembersSeed(ACTOR))?,
                "action" => event.action = map.next_value_seed(MembersSeed(ACTION))?,
                "resource" => event.resource = map.next_value_seed(MembersSeed(RESOURCE))?,
                "zone" => event.zone = map.next_value_seed(MembersSeed(ZONE))?,
                "raw" => event.raw = map.next_value_seed(MembersSeed(RAW))?,
                _ => map.next_value::<Checked>().map(drop)?,
            }
        }
        Ok(Ok(event))
    }
}

/// A key, borrowed where it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The wanted members of an object; of any other value, none.
struct MembersSeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for MembersSeed {
    type Value = Members<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl MembersSeed {
    fn not_object<'de>(&self, _: &'static str) -> Members<'de> {
        Members {
            names: self.0,
            ..Members::default()
        }
    }
}

impl<'de> Visitor<'de> for MembersSeed {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    not_an_object!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Members {
            names: self.0,
            ..Members::default()
        };
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match self.0.iter().position(|name| *name == key.0) {
                Some(at) => members.values[at] = Some(map.next_value()?),
                None => map.next_value::<Checked>().map(drop)?,
            }
        }
        Ok(members)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Text(Cow::Owned(s.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other(Value::Bool(b)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other(Value::from(n)))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Other(Value::from(n)))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Scalar<'de>, E> {
                // As the tree holds it (a JSON number is never NaN or infinite).
                Ok(Scalar::Other(
                    serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Scalar::Other)
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}

/// A value parsed as the tree would parse it (every string decoded, every number converted,
/// so that each is refused as it would be there) and dropped. `IgnoredAny` only skips: it
/// would let through a lone surrogate escape or a number out of range, which the tree refuses
/// (and PostgreSQL's `jsonb` refuses the first too).
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CheckedVisitor;
        impl<'de> Visitor<'de> for CheckedVisitor {
            type Value = Checked;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                while map.next_entry::<Checked, Checked>()?.is_some() {}
                Ok(Checked)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }
        }
        d.deserialize_any(CheckedVisitor)
    }
}
