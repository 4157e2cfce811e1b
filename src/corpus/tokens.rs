//! Token dtypes and zero-copy, dtype-tagged views of a document's tokens.
//!
//! Megatron stores tokens in whichever numpy dtype the tokenizer's vocabulary fits
//! (uint16 below 65,500 ids, int32 above: there is no uint32 code), and raw token
//! arrays use uint16 or uint32. Rather than widen every document on the hot path, the
//! readers hand out a [`Tokens`] that borrows the mapped bytes and remembers the dtype;
//! consumers convert once, into the buffer they actually fill.

use serde::Serialize;

/// An element type of a token file: every code Megatron defines, plus uint32 for raw arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// Megatron code 1.
    Uint8,
    /// Megatron code 2.
    Int8,
    /// Megatron code 3.
    Int16,
    /// Megatron code 4: what Megatron uses for vocabularies of 65,500 ids or more.
    Int32,
    /// Megatron code 5.
    Int64,
    /// Megatron code 6.
    Float64,
    /// Megatron code 7.
    Float32,
    /// Megatron code 8: the common case for vocabularies under 65,500 ids.
    Uint16,
    /// No Megatron code; used by raw (OLMo/nanoGPT-style) token arrays.
    Uint32,
}

impl DType {
    /// Maps a Megatron `.idx` dtype code to a dtype, `None` for codes Megatron does not define.
    pub fn from_megatron_code(code: u8) -> Option<DType> {
        Some(match code {
            1 => DType::Uint8,
            2 => DType::Int8,
            3 => DType::Int16,
            4 => DType::Int32,
            5 => DType::Int64,
            6 => DType::Float64,
            7 => DType::Float32,
            8 => DType::Uint16,
            _ => return None,
        })
    }

    /// The Megatron code of this dtype; `None` for uint32, which Megatron cannot store.
    pub fn megatron_code(self) -> Option<u8> {
        Some(match self {
            DType::Uint8 => 1,
            DType::Int8 => 2,
            DType::Int16 => 3,
            DType::Int32 => 4,
            DType::Int64 => 5,
            DType::Float64 => 6,
            DType::Float32 => 7,
            DType::Uint16 => 8,
            DType::Uint32 => return None,
        })
    }

    /// Bytes per token, needed to turn byte pointers into token offsets.
    pub fn size(self) -> usize {
        match self {
            DType::Uint8 | DType::Int8 => 1,
            DType::Int16 | DType::Uint16 => 2,
            DType::Int32 | DType::Uint32 | DType::Float32 => 4,
            DType::Int64 | DType::Float64 => 8,
        }
    }

    /// The numpy-style name, used in reports, configs and error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::Uint8 => "uint8",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::Float64 => "float64",
            DType::Float32 => "float32",
            DType::Uint16 => "uint16",
            DType::Uint32 => "uint32",
        }
    }

    /// Parses a numpy-style name, so that configs and flags say what numpy would.
    pub fn from_name(name: &str) -> Option<DType> {
        Some(match name {
            "uint8" | "u8" => DType::Uint8,
            "int8" | "i8" => DType::Int8,
            "int16" | "i16" => DType::Int16,
            "int32" | "i32" => DType::Int32,
            "int64" | "i64" => DType::Int64,
            "float64" | "f64" => DType::Float64,
            "float32" | "f32" => DType::Float32,
            "uint16" | "u16" => DType::Uint16,
            "uint32" | "u32" => DType::Uint32,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A borrowed run of tokens in the dtype they are stored in: the zero-copy unit the
/// readers hand out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tokens<'a> {
    /// uint8 tokens.
    Uint8(&'a [u8]),
    /// int8 tokens.
    Int8(&'a [i8]),
    /// int16 tokens.
    Int16(&'a [i16]),
    /// int32 tokens.
    Int32(&'a [i32]),
    /// int64 tokens.
    Int64(&'a [i64]),
    /// float64 tokens (Megatron defines the code; nobody should use it for ids).
    Float64(&'a [f64]),
    /// float32 tokens (as above).
    Float32(&'a [f32]),
    /// uint16 tokens.
    Uint16(&'a [u16]),
    /// uint32 tokens.
    Uint32(&'a [u32]),
}

/// Expands `$body` once per variant with `$s` bound to the typed slice.
macro_rules! each_variant {
    ($tokens:expr, $s:ident => $body:expr) => {
        match $tokens {
            Tokens::Uint8($s) => $body,
            Tokens::Int8($s) => $body,
            Tokens::Int16($s) => $body,
            Tokens::Int32($s) => $body,
            Tokens::Int64($s) => $body,
            Tokens::Float64($s) => $body,
            Tokens::Float32($s) => $body,
            Tokens::Uint16($s) => $body,
            Tokens::Uint32($s) => $body,
        }
    };
}

impl<'a> Tokens<'a> {
    /// Reinterprets little-endian bytes as tokens of `dtype`; `None` when the length or the
    /// alignment does not fit (the readers check both before calling, so `None` is a bug
    /// in the caller or a corrupt file that slipped through, never silently wrong data).
    pub fn from_bytes(dtype: DType, bytes: &'a [u8]) -> Option<Tokens<'a>> {
        use bytemuck::try_cast_slice as cast;
        if bytes.is_empty() {
            // An empty `&[u8]` may sit at any address; give each type its own empty slice.
            return Some(match dtype {
                DType::Uint8 => Tokens::Uint8(&[]),
                DType::Int8 => Tokens::Int8(&[]),
                DType::Int16 => Tokens::Int16(&[]),
                DType::Int32 => Tokens::Int32(&[]),
                DType::Int64 => Tokens::Int64(&[]),
                DType::Float64 => Tokens::Float64(&[]),
                DType::Float32 => Tokens::Float32(&[]),
                DType::Uint16 => Tokens::Uint16(&[]),
                DType::Uint32 => Tokens::Uint32(&[]),
            });
        }
        Some(match dtype {
            DType::Uint8 => Tokens::Uint8(bytes),
            DType::Int8 => Tokens::Int8(cast(bytes).ok()?),
            DType::Int16 => Tokens::Int16(cast(bytes).ok()?),
            DType::Int32 => Tokens::Int32(cast(bytes).ok()?),
            DType::Int64 => Tokens::Int64(cast(bytes).ok()?),
            DType::Float64 => Tokens::Float64(cast(bytes).ok()?),
            DType::Float32 => Tokens::Float32(cast(bytes).ok()?),
            DType::Uint16 => Tokens::Uint16(cast(bytes).ok()?),
            DType::Uint32 => Tokens::Uint32(cast(bytes).ok()?),
        })
    }

    /// The stored dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Tokens::Uint8(_) => DType::Uint8,
            Tokens::Int8(_) => DType::Int8,
            Tokens::Int16(_) => DType::Int16,
            Tokens::Int32(_) => DType::Int32,
            Tokens::Int64(_) => DType::Int64,
            Tokens::Float64(_) => DType::Float64,
            Tokens::Float32(_) => DType::Float32,
            Tokens::Uint16(_) => DType::Uint16,
            Tokens::Uint32(_) => DType::Uint32,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        each_variant!(self, s => s.len())
    }

    /// True when the run holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw bytes, for hashing and bulk copies.
    pub fn as_bytes(&self) -> &'a [u8] {
        each_variant!(*self, s => bytemuck::cast_slice(s))
    }

    /// The tokens as JSON numbers: integers stay integers, float dtypes stay floats.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        use serde_json::Value;
        match *self {
            Tokens::Float64(s) => s.iter().map(|&v| float_json(v)).collect(),
            Tokens::Float32(s) => s.iter().map(|&v| float_json(f64::from(v))).collect(),
            Tokens::Int64(s) => s.iter().map(|&v| Value::from(v)).collect(),
            Tokens::Int32(s) => s.iter().map(|&v| Value::from(v)).collect(),
            Tokens::Int16(s) => s.iter().map(|&v| Value::from(v)).collect(),
            Tokens::Int8(s) => s.iter().map(|&v| Value::from(v)).collect(),
            Tokens::Uint8(s) => s.iter().map(|&v| Value::from(v)).collect(),
            Tokens::Uint16(s) => s.iter().map(|&v| Value::from(v)).collect(),
            Tokens::Uint32(s) => s.iter().map(|&v| Value::from(v)).collect(),
        }
    }

    /// Token `i` widened to i64 (floats truncated toward zero), for checks and tests.
    pub fn get_i64(&self, i: usize) -> Option<i64> {
        Some(match *self {
            Tokens::Uint8(s) => i64::from(*s.get(i)?),
            Tokens::Int8(s) => i64::from(*s.get(i)?),
            Tokens::Int16(s) => i64::from(*s.get(i)?),
            Tokens::Int32(s) => i64::from(*s.get(i)?),
            Tokens::Int64(s) => *s.get(i)?,
            Tokens::Float64(s) => *s.get(i)? as i64,
            Tokens::Float32(s) => *s.get(i)? as i64,
            Tokens::Uint16(s) => i64::from(*s.get(i)?),
            Tokens::Uint32(s) => i64::from(*s.get(i)?),
        })
    }
}

/// NaN and infinities are not JSON numbers; they print as null rather than fail the report.
fn float_json(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}
