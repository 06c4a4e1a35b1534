//! The GGUF container (v2 and v3, little-endian): header, metadata and tensor table.
//!
//! The file is untrusted, so every count, length, dimension and offset is checked against
//! the bytes that are actually left before anything is allocated from it, and all size
//! arithmetic is checked. Arrays in the metadata are not decoded when the header is read:
//! they are kept as a byte range and decoded on demand, so a file of N bytes costs O(N)
//! memory at most, never a multiple of an element count it claims.
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::quantized::GgmlDType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: usize = 4;
/// Arrays of arrays nest at most this deep (real files use none), so a crafted chain of
/// nested arrays cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value type, by its GGUF code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl MetaType {
    fn from_code(code: u32) -> Option<Self> {
        use MetaType::*;
        Some(match code {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of a fixed-size value; `None` for strings and arrays.
    fn fixed_size(self) -> Option<usize> {
        use MetaType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// The fewest bytes one value of this type can take (a string or array is at least its
    /// length prefix; an array also names its element type).
    fn min_size(self) -> usize {
        match self {
            MetaType::String => 8,
            MetaType::Array => 12,
            fixed => fixed.fixed_size().unwrap_or(1),
        }
    }
}

/// One metadata value. Arrays stay undecoded in the file (see [`GgufArray`]).
#[derive(Debug, Clone)]
pub enum MetaValue {
    Int(i128),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// Values are equal when they were read from the same bytes: floats compare by their bits,
/// so a NaN in a file equals itself when the header is read again (from a prefix, say).
impl PartialEq for MetaValue {
    fn eq(&self, other: &Self) -> bool {
        use MetaValue::*;
        match (self, other) {
            (Int(a), Int(b)) => a == b,
            (F32(a), F32(b)) => a.to_bits() == b.to_bits(),
            (F64(a), F64(b)) => a.to_bits() == b.to_bits(),
            (Bool(a), Bool(b)) => a == b,
            (String(a), String(b)) => a == b,
            (Array(a), Array(b)) => a == b,
            _ => false,
        }
    }
}

/// An array in the metadata: its element type, length and where its elements lie.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufArray {
    pub elem: MetaType,
    pub len: usize,
    bytes: Range<usize>,
}

/// One tensor of the table: its type, shape (row-major, outermost first, as candle uses
/// it) and where its bytes lie in the file (`u64`: in wasm32 a file may outgrow `usize`).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
    pub bytes: Range<u64>,
}

/// A parsed and validated GGUF header. It refers to the file by byte ranges; the bytes
/// themselves stay with the caller.
#[derive(Debug)]
pub struct GgufFile {
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// What [`GgufFile::parse_prefix`] makes of the first bytes of a file.
#[derive(Debug)]
pub enum Parsed {
    /// The whole header was in the bytes given.
    Header(GgufFile),
    /// The header goes on past them: read at least this many bytes from the start.
    NeedBytes(usize),
}

/// Reads little-endian values from the first bytes of a file of `file_len` bytes, failing
/// (never panicking) past their end. Counts are bounded by what the whole file can hold;
/// a read past the bytes at hand that the file could still satisfy is recorded in `short`.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    file_len: u64,
    short: Option<usize>,
}

type ParseResult<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn whole(bytes: &'a [u8], pos: usize) -> Self {
        Self {
            bytes,
            pos,
            file_len: bytes.len() as u64,
            short: None,
        }
    }

    /// Bytes left in the file (not only in the bytes at hand), saturating in wasm32.
    fn left(&self) -> usize {
        usize::try_from(self.file_len.saturating_sub(self.pos as u64)).unwrap_or(usize::MAX)
    }

    fn take(&mut self, n: usize, what: &str) -> ParseResult<&'a [u8]> {
        if n > self.left() {
            return Err(format!(
                "{what} needs {n} bytes at offset {}, only {} left in the file",
                self.pos,
                self.left()
            ));
        }
        let end = self.pos + n;
        let Some(out) = self.bytes.get(self.pos..end) else {
            self.short = Some(end);
            return Err(format!(
                "{what} lies past the first {} bytes read",
                self.bytes.len()
            ));
        };
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> ParseResult<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length that must fit in the bytes left, each item at least `min_size` bytes.
    fn count(&mut self, min_size: usize, what: &str) -> ParseResult<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.checked_mul(min_size).is_some_and(|b| b <= self.left()));
        fits.ok_or_else(|| {
            format!(
                "{what} is {n}, more than the {} bytes left in the file can hold",
                self.left()
            )
        })
    }

    fn string(&mut self, what: &str) -> ParseResult<String> {
        let len = self.count(1, what)?;
        let raw = self.take(len, what)?;
        // Some converters write a trailing NUL; tokens may hold invalid UTF-8 (they are
        // byte-level pieces), which the tokenizer then rejects with its own error.
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    fn value(&mut self, ty: MetaType, depth: usize, what: &str) -> ParseResult<MetaValue> {
        let int = |b: &[u8], signed: bool| -> i128 {
            let mut wide = [if signed && b[b.len() - 1] & 0x80 != 0 {
                0xff
            } else {
                0
            }; 16];
            wide[..b.len()].copy_from_slice(b);
            i128::from_le_bytes(wide)
        };
        Ok(match ty {
            MetaType::U8 | MetaType::U16 | MetaType::U32 | MetaType::U64 => {
                MetaValue::Int(int(self.take(ty.min_size(), what)?, false))
            }
            MetaType::I8 | MetaType::I16 | MetaType::I32 | MetaType::I64 => {
                MetaValue::Int(int(self.take(ty.min_size(), what)?, true))
            }
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            MetaType::Bool => match self.take(1, what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("{what}: boolean byte {b} is neither 0 nor 1")),
            },
            MetaType::String => MetaValue::String(self.string(what)?),
            MetaType::Array => MetaValue::Array(self.skip_array(depth, what)?),
        })
    }

    fn meta_type(&mut self, what: &str) -> ParseResult<MetaType> {
        let code = self.u32(what)?;
        MetaType::from_code(code).ok_or_else(|| format!("{what} has unknown value type {code}"))
    }

    /// Checks an array's structure and moves past it, without decoding its elements.
    fn skip_array(&mut self, depth: usize, what: &str) -> ParseResult<GgufArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!(
                "{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
            ));
        }
        let elem = self.meta_type(what)?;
        let len = self.count(elem.min_size(), what)?;
        let start = self.pos;
        match elem.fixed_size() {
            // `count` has checked that len × size fits in what is left.
            Some(size) => {
                self.take(len * size, what)?;
            }
            None => {
                for _ in 0..len {
                    match elem {
                        MetaType::String => {
                            let n = self.count(1, what)?;
                            self.take(n, what)?;
                        }
                        _ => {
                            self.skip_array(depth + 1, what)?;
                        }
                    }
                }
            }
        }
        Ok(GgufArray {
            elem,
            len,
            bytes: start..self.pos,
        })
    }
}

/// GGML tensor type codes (ggml.h's `ggml_type`) that candle can hold.
fn ggml_dtype(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

impl GgufFile {
    /// Parses and validates the header of `bytes`: afterwards every tensor's byte range lies
    /// within `bytes` and matches its type and shape exactly.
    pub fn parse(bytes: &[u8]) -> ParseResult<Self> {
        match Self::parse_prefix(bytes, bytes.len() as u64)? {
            Parsed::Header(file) => Ok(file),
            // A whole file is never short of itself; said rather than assumed.
            Parsed::NeedBytes(n) => Err(format!("the header needs {n} bytes")),
        }
    }

    /// Parses and validates the header of a file of `file_len` bytes from its first
    /// `bytes`, as a file read by ranges must be: afterwards every tensor's byte range lies
    /// within the file, and every array within `bytes`. A valid file's header is parsed
    /// the same from any prefix that holds it, and from a shorter one asks for more.
    pub fn parse_prefix(bytes: &[u8], file_len: u64) -> ParseResult<Parsed> {
        let mut r = Reader {
            bytes,
            pos: 0,
            file_len,
            short: None,
        };
        match Self::read_header(&mut r) {
            Ok(file) => Ok(Parsed::Header(file)),
            Err(e) => match r.short {
                Some(need) => Ok(Parsed::NeedBytes(need)),
                None => Err(e),
            },
        }
    }

    fn read_header(r: &mut Reader) -> ParseResult<Self> {
        let magic = r.array::<4>("the magic number")?;
        if &magic != MAGIC {
            return Err(if magic == *b"FUGG" {
                "big-endian GGUF files are not supported".to_string()
            } else {
                "it does not start with the GGUF magic number".to_string()
            });
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are; convert the model again with a current llama.cpp)"
            ));
        }
        // A tensor entry is at least a name length, a dimension count, one dimension, a
        // type and an offset; a metadata entry a key length, a type and one byte.
        let tensor_count = r.count(32, "the tensor count")?;
        let kv_count = r.count(13, "the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.meta_type(&format!("metadata {key}"))?;
            let value = r.value(ty, 0, &format!("metadata {key}"))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("metadata {key} appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::Int(a)) => usize::try_from(*a)
                .ok()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| format!("general.alignment {a} is not a power of two"))?,
            Some(_) => return Err("general.alignment is not an integer".to_string()),
        };
        let mut table = Vec::new();
        for i in 0..tensor_count {
            let name = r.string(&format!("tensor name #{i}"))?;
            let what = format!("tensor {name}");
            let n_dims = r.u32(&what)? as usize;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(format!(
                    "{what} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64(&what)?;
                dims.push(
                    usize::try_from(d)
                        .ok()
                        .filter(|&d| d > 0)
                        .ok_or_else(|| format!("{what} has dimension {d}"))?,
                );
            }
            let code = r.u32(&what)?;
            let dtype =
                ggml_dtype(code).ok_or_else(|| format!("{what} has unknown GGML type {code}"))?;
            let offset = r.u64(&what)?;
            table.push((name, dtype, dims, offset));
        }
        let data_start = r
            .pos
            .checked_next_multiple_of(alignment)
            .ok_or("the tensor data offset overflows")?;
        let mut tensors = BTreeMap::new();
        for (name, dtype, ggml_dims, offset) in table {
            let info = tensor_info(&name, dtype, ggml_dims, offset, data_start, alignment)?;
            if info.bytes.end > r.file_len {
                return Err(format!(
                    "tensor {name} lies at bytes {}..{}, past the end of the {}-byte file",
                    info.bytes.start, info.bytes.end, r.file_len
                ));
            }
            if tensors.insert(name.clone(), info).is_some() {
                return Err(format!("tensor {name} appears twice"));
            }
        }
        Ok(Self { metadata, tensors })
    }
}

/// Checks one tensor entry's arithmetic: `ggml_dims` is innermost first, as GGUF stores it.
fn tensor_info(
    name: &str,
    dtype: GgmlDType,
    ggml_dims: Vec<usize>,
    offset: u64,
    data_start: usize,
    alignment: usize,
) -> ParseResult<TensorInfo> {
    let overflow = || format!("tensor {name}: its size overflows");
    let block = dtype.block_size();
    if !ggml_dims[0].is_multiple_of(block) {
        return Err(format!(
            "tensor {name}: row length {} is not a multiple of the {dtype:?} block size {block}",
            ggml_dims[0]
        ));
    }
    let elems = ggml_dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    let len = (elems / block)
        .checked_mul(dtype.type_size())
        .ok_or_else(overflow)? as u64;
    if !offset.is_multiple_of(alignment as u64) {
        return Err(format!(
            "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
        ));
    }
    let start = (data_start as u64)
        .checked_add(offset)
        .ok_or_else(overflow)?;
    let end = start.checked_add(len).ok_or_else(overflow)?;
    let mut shape = ggml_dims;
    shape.reverse();
    Ok(TensorInfo {
        dtype,
        shape,
        bytes: start..end,
    })
}

impl GgufArray {
    fn reader<'a>(&self, file: &'a [u8]) -> ParseResult<Reader<'a>> {
        let bytes = file
            .get(..self.bytes.end)
            .ok_or("the array lies past the end of the file")?;
        Ok(Reader::whole(bytes, self.bytes.start))
    }

    /// The elements as strings (a string array), decoded from `file`.
    pub fn strings(&self, file: &[u8]) -> ParseResult<Vec<String>> {
        if self.elem != MetaType::String {
            return Err(format!("holds {:?} values, not strings", self.elem));
        }
        let mut r = self.reader(file)?;
        (0..self.len)
            .map(|_| r.string("an array element"))
            .collect()
    }

    /// The elements as integers (an array of any integer type), decoded from `file`.
    pub fn ints(&self, file: &[u8]) -> ParseResult<Vec<i128>> {
        let mut r = self.reader(file)?;
        (0..self.len)
            .map(|_| match r.value(self.elem, 0, "an array element")? {
                MetaValue::Int(v) => Ok(v),
                _ => Err(format!("holds {:?} values, not integers", self.elem)),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 file with `kvs` metadata entries (already encoded) and no tensors.
    fn file(kvs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for kv in kvs {
            b.extend(kv);
        }
        b
    }

    fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(value);
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    #[test]
    fn reads_values_and_arrays_lazily() {
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend(2u64.to_le_bytes());
        arr.extend(string("a"));
        arr.extend(string("bc"));
        let mut ints = 5u32.to_le_bytes().to_vec();
        ints.extend(2u64.to_le_bytes());
        ints.extend((-3i32).to_le_bytes());
        ints.extend(7i32.to_le_bytes());
        let bytes = file(&[
            kv("x", 4, &9u32.to_le_bytes()),
            kv("neg", 5, &(-2i32).to_le_bytes()),
            kv("s", 8, &string("hi")),
            kv("toks", 9, &arr),
            kv("ids", 9, &ints),
        ]);
        let f = GgufFile::parse(&bytes).unwrap();
        assert_eq!(f.metadata["x"], MetaValue::Int(9));
        assert_eq!(f.metadata["neg"], MetaValue::Int(-2));
        assert_eq!(f.metadata["s"], MetaValue::String("hi".into()));
        let MetaValue::Array(a) = &f.metadata["toks"] else {
            panic!()
        };
        assert_eq!(a.strings(&bytes).unwrap(), ["a", "bc"]);
        assert!(a.ints(&bytes).is_err());
        let MetaValue::Array(a) = &f.metadata["ids"] else {
            panic!()
        };
        assert_eq!(a.ints(&bytes).unwrap(), [-3, 7]);
    }

    #[test]
    fn refuses_lengths_the_file_cannot_hold() {
        // 10^8 u32 elements claimed, none present.
        let mut arr = 4u32.to_le_bytes().to_vec();
        arr.extend(100_000_000u64.to_le_bytes());
        let err = GgufFile::parse(&file(&[kv("big", 9, &arr)])).unwrap_err();
        assert!(err.contains("more than the"), "{err}");
        let mut s = (u64::MAX).to_le_bytes().to_vec();
        s.extend(b"abc");
        assert!(GgufFile::parse(&file(&[kv("s", 8, &s)])).is_err());
    }

    #[test]
    fn a_prefix_either_holds_the_whole_header_or_asks_for_more() {
        // The q8_0 fixture embeds its tokenizer: a header of ~1.5 MB.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-phi-q8_0.gguf"
        );
        let bytes = std::fs::read(path).unwrap();
        let whole = GgufFile::parse(&bytes).unwrap();
        let len = bytes.len();
        let mut header_end = None;
        for cut in (0..4096).chain((4096..len).step_by(9973)) {
            match GgufFile::parse_prefix(&bytes[..cut], len as u64).unwrap() {
                Parsed::NeedBytes(n) => {
                    assert!(n > cut && n <= len, "{cut}: asked for {n}");
                    assert!(header_end.is_none(), "{cut}: short after a whole header");
                }
                Parsed::Header(f) => {
                    assert_eq!(
                        (f.metadata, f.tensors),
                        (whole.metadata.clone(), whole.tensors.clone())
                    );
                    header_end.get_or_insert(cut);
                }
            }
        }
        assert!(
            header_end.is_some_and(|end| end > 1 << 20),
            "{header_end:?}"
        );
        // A file's own errors are errors from a prefix too, not a request for more.
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(GgufFile::parse_prefix(&bad[..64], len as u64).is_err());
    }

    #[test]
    fn refuses_bad_alignment_and_deep_nesting() {
        for a in [0u32, 3, 48] {
            let err = GgufFile::parse(&file(&[kv("general.alignment", 4, &a.to_le_bytes())]))
                .unwrap_err();
            assert!(err.contains("power of two"), "{err}");
        }
        let mut nested = Vec::new();
        for _ in 0..10 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        nested.extend(4u32.to_le_bytes());
        nested.extend(0u64.to_le_bytes());
        let err = GgufFile::parse(&file(&[kv("n", 9, &nested)])).unwrap_err();
        assert!(err.contains("nested"), "{err}");
    }
}
