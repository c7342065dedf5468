//! Newtypes for sizes and device identifiers, so a byte count is never confused
//! with a sector count or an id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes. Parses `"10GiB"`, `"512MiB"`, `"4096"`, `"1G"` (binary units).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

impl Bytes {
    /// One mebibyte.
    pub const MIB: Bytes = Bytes(1 << 20);
    /// One gibibyte.
    pub const GIB: Bytes = Bytes(1 << 30);

    /// The raw count.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Rounds up to a multiple of `align` (a power of two).
    pub const fn align_up(self, align: u64) -> Bytes {
        Bytes(self.0.div_ceil(align) * align)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, unit) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{name}", self.0 / unit);
            }
        }
        for (name, unit) in UNITS {
            if self.0 >= unit {
                return write!(f, "{:.1}{name}", self.0 as f64 / unit as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// Why a size string did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {0:?}: expected a number with an optional unit (K, M, G, T, KiB, MiB, GiB, TiB)")]
pub struct ParseBytesError(String);

impl FromStr for Bytes {
    type Err = ParseBytesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseBytesError(s.to_owned());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| err())?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" | "k" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            _ => return Err(err()),
        };
        n.checked_mul(1u64 << shift).map(Bytes).ok_or_else(err)
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Num(n) => Ok(Bytes(n)),
            Repr::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Identifier of a device in a pool. Allocated from a counter in the metadata store
/// and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub u64);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev-{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!("10GiB".parse(), Ok(Bytes(10 << 30)));
        assert_eq!("512M".parse(), Ok(Bytes(512 << 20)));
        assert_eq!(" 4096 ".parse(), Ok(Bytes(4096)));
        assert!("10 XB".parse::<Bytes>().is_err());
        assert!("GiB".parse::<Bytes>().is_err());
        assert!("99999999999T".parse::<Bytes>().is_err());
    }

    #[test]
    fn displays_sizes() {
        assert_eq!(Bytes(10 << 30).to_string(), "10GiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1536MiB");
        assert_eq!(Bytes(1000).to_string(), "1000B");
        assert_eq!(Bytes((1 << 30) + 1).to_string(), "1.0GiB");
    }

    #[test]
    fn deserializes_numbers_and_strings() {
        #[derive(Deserialize)]
        struct T {
            a: Bytes,
            b: Bytes,
        }
        let t: T = serde_json::from_str(r#"{"a": 42, "b": "2GiB"}"#).expect("valid");
        assert_eq!((t.a, t.b), (Bytes(42), Bytes(2 << 30)));
    }

    #[test]
    fn aligns_up() {
        assert_eq!(Bytes(1).align_up(4096), Bytes(4096));
        assert_eq!(Bytes(8192).align_up(4096), Bytes(8192));
    }
}
