//! safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (as `save_pretrained` writes them). A shard is either all
//! at hand (memory-mapped, or bytes the browser read whole) or read by ranges as each
//! tensor is fetched (a download the browser keeps on disk, a picked file), so a checkpoint
//! larger than the tab's memory streams through one tensor at a time.
//!
//! The header is read here rather than by the `safetensors` crate because its offsets are
//! `usize`: in wasm32 that is 32 bits, and Phi-2's first shard is 5 GB.

use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use ::safetensors::tensor::{Dtype, TensorView};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use serde::Deserialize;

use super::range_read::{read_exact, Staged};
use super::{Bytes, RangeRead, StoredTensor, TensorSource, Weight};
use crate::error::{Error, Result};
use crate::model::stored::StoredBytes;
use crate::model::BoxFuture;

/// safetensors' own limit on a header.
const MAX_HEADER: u64 = 100_000_000;
/// Bytes of a mapped tensor converted at a time (see `values`).
const PART: u64 = 16 << 20;

/// Appends stored little-endian values to f32s.
type Widen = fn(&[u8], &mut Vec<f32>);

/// Where a shard's bytes are.
enum Data {
    /// Shared with the f16 matrices used in place (`stored_f16_bytes`), which keep it alive.
    Whole(Arc<Bytes>),
    /// Read by ranges, tensor by tensor as they are fetched.
    Ranged(Staged),
}

/// One tensor's header entry, with its bytes' place in the file.
struct Info {
    dtype: Dtype,
    shape: Vec<usize>,
    extent: Range<u64>,
}

struct Shard {
    name: String,
    data: Data,
    tensors: HashMap<String, Info>,
}

pub struct Safetensors {
    shards: Vec<Shard>,
    /// tensor name → index into `shards`
    index: HashMap<String, usize>,
    dtype: DType,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The tensors of a file of `file_len` bytes whose JSON header is `json`. Their extents
/// must tile the rest of the file exactly, as safetensors requires, each as long as its
/// dtype and shape say, so every extent read later lies within the file.
fn parse_header(name: &str, json: &[u8], file_len: u64) -> Result<HashMap<String, Info>> {
    let bad = |m: String| Error::file(name, format!("not a valid safetensors file: {m}"));
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("header: {e}")))?;
    let base = 8 + json.len() as u64;
    let mut entries = Vec::with_capacity(raw.len());
    for (tensor, value) in raw {
        if tensor == "__metadata__" {
            continue;
        }
        let e: Entry = serde_json::from_value(value)
            .map_err(|e| bad(format!("header entry {tensor}: {e}")))?;
        entries.push((tensor, e));
    }
    entries.sort_by_key(|(_, e)| e.data_offsets);
    let mut end = 0u64;
    let mut tensors = HashMap::with_capacity(entries.len());
    for (tensor, e) in entries {
        let (start, stop) = e.data_offsets;
        let bits = e
            .shape
            .iter()
            .try_fold(e.dtype.bitsize() as u64, |n, &d| n.checked_mul(d as u64));
        let expected = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        if start != end || stop.checked_sub(start) != expected {
            return Err(bad(format!(
                "tensor {tensor}'s bytes {start}..{stop} do not follow the previous tensor's end {end} with the {expected:?} bytes its dtype and shape need"
            )));
        }
        end = stop;
        let extent = base + start..base + stop;
        tensors.insert(
            tensor,
            Info {
                dtype: e.dtype,
                shape: e.shape,
                extent,
            },
        );
    }
    if base.checked_add(end) != Some(file_len) {
        return Err(bad(format!(
            "the header describes {end} bytes of tensors, the file has {}",
            file_len.saturating_sub(base)
        )));
    }
    Ok(tensors)
}

/// The length of the JSON header a file's first 8 bytes announce, checked against the file.
fn header_len(name: &str, first8: &[u8], file_len: u64) -> Result<u64> {
    let bad = |m: &str| Error::file(name, format!("not a valid safetensors file: {m}"));
    let n: [u8; 8] = first8
        .try_into()
        .map_err(|_| bad("shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(bad(&format!(
            "a header of {n} bytes in a file of {file_len}"
        )));
    }
    Ok(n)
}

/// `range` of bytes that are in memory.
fn within<'a>(bytes: &'a [u8], range: &Range<u64>) -> &'a [u8] {
    // Every extent was checked to lie within its file, whose bytes these are.
    &bytes[range.start as usize..range.end as usize]
}

impl Safetensors {
    /// Parses and validates the header of each file; `dtype` is the compute dtype that
    /// tensors are converted to when read.
    pub fn from_shards(files: Vec<(String, Bytes)>, dtype: DType) -> Result<Self> {
        let shards = files
            .into_iter()
            .map(|(name, bytes)| {
                if bytes.is_empty() {
                    return Err(Error::file(&name, "file is empty"));
                }
                let len = bytes.len() as u64;
                let n = header_len(&name, bytes.get(..8).unwrap_or(&bytes), len)?;
                let tensors = parse_header(&name, within(&bytes, &(8..8 + n)), len)?;
                Ok(Shard {
                    name,
                    data: Data::Whole(Arc::new(bytes)),
                    tensors,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(shards, dtype)
    }

    /// Reads only the header of each file; tensors are read by ranges as they are fetched.
    pub async fn from_ranged(
        files: Vec<(String, Rc<dyn RangeRead>)>,
        dtype: DType,
    ) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        for (name, file) in files {
            let len = file.size();
            if len == 0 {
                return Err(Error::file(&name, "file is empty"));
            }
            let first8 = read_exact(&*file, &name, 0..8.min(len), "the header").await?;
            let n = header_len(&name, &first8, len)?;
            let json = read_exact(&*file, &name, 8..8 + n, "the header").await?;
            let tensors = parse_header(&name, &json, len)?;
            shards.push(Shard {
                data: Data::Ranged(Staged::new(name.clone(), file)),
                name,
                tensors,
            });
        }
        Self::new(shards, dtype)
    }

    fn new(shards: Vec<Shard>, dtype: DType) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::input("no safetensors files given"));
        }
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for tensor in shard.tensors.keys() {
                if index.insert(tensor.clone(), i).is_some() {
                    return Err(Error::file(
                        &shard.name,
                        format!("tensor {tensor} appears in more than one shard"),
                    ));
                }
            }
        }
        Ok(Self {
            shards,
            index,
            dtype,
        })
    }

    /// Whether any shard holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shard file names listed by a `model.safetensors.index.json`, deduplicated,
    /// in first-seen order. Names must be plain file names in the same folder.
    pub fn shard_names(index_json: &str, source: &str) -> Result<Vec<String>> {
        let index: ShardIndex = serde_json::from_str(index_json)
            .map_err(|e| Error::file(source, format!("not a valid safetensors index: {e}")))?;
        let mut names: Vec<String> = Vec::new();
        let mut sorted: Vec<_> = index.weight_map.values().collect();
        sorted.sort();
        for file in sorted {
            if file.contains('/') || file.contains('\\') || file.starts_with('.') || file.is_empty()
            {
                return Err(Error::file(
                    source,
                    format!("shard name {file:?} is not a plain file name"),
                ));
            }
            if !names.contains(file) {
                names.push(file.clone());
            }
        }
        if names.is_empty() {
            return Err(Error::file(source, "weight_map lists no shards"));
        }
        Ok(names)
    }

    /// The tensor `name`, its shard, and where its bytes lie in that shard.
    /// The tensor `name`'s header entry and its shard.
    fn locate(&self, name: &str) -> Result<(&Shard, &Info)> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| self.missing(name))?;
        Ok((shard, &shard.tensors[name]))
    }

    /// Values of `shape` from `range` (within tensor `name`'s extent) of the shard's bytes,
    /// converted to the compute dtype. Once `last` is read, the bytes are let go: a mapped
    /// file's pages leave memory, a ranged file's staged copy is dropped.
    fn values(
        &self,
        (shard, info): (&Shard, &Info),
        name: &str,
        shape: Vec<usize>,
        range: Range<u64>,
        last: bool,
    ) -> Result<Tensor> {
        let bad = |e: String| Error::file(&shard.name, format!("tensor {name}: {e}"));
        let load = |bytes: &[u8], shape: Vec<usize>| -> Result<Tensor> {
            let view = TensorView::new(info.dtype, shape, bytes).map_err(|e| bad(e.to_string()))?;
            view.load(&Device::Cpu)
                .and_then(|t| t.to_dtype(self.dtype))
                .map_err(|e| bad(e.to_string()))
        };
        // To f32 straight from the bytes (one copy, exact), a part at a time: whole, a mapped
        // tensor's pages and its f32 copy were resident together, and the output layer
        // raised the peak by its own size (17% of a 1.6 GB checkpoint).
        let widen: Option<Widen> = match (self.dtype, info.dtype) {
            (DType::F32, Dtype::F32) => Some(|raw, out| {
                out.extend(
                    raw.chunks_exact(4)
                        .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]])),
                )
            }),
            (DType::F32, Dtype::F16) => Some(|raw, out| {
                out.extend(
                    raw.chunks_exact(2)
                        .map(|v| f16::from_le_bytes([v[0], v[1]]).to_f32()),
                )
            }),
            (DType::F32, Dtype::BF16) => Some(|raw, out| {
                out.extend(
                    raw.chunks_exact(2)
                        .map(|v| bf16::from_le_bytes([v[0], v[1]]).to_f32()),
                )
            }),
            _ => None,
        };
        let Some(widen) = widen else {
            return self.read((shard, info), name, range, last, |bytes| load(bytes, shape));
        };
        let elem = (info.dtype.bitsize() / 8) as u64;
        let mut values = Vec::with_capacity(((range.end - range.start) / elem) as usize);
        self.read_parts((shard, info), name, range, last, elem, |raw| {
            widen(raw, &mut values);
            Ok(())
        })?;
        Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| bad(e.to_string()))
    }

    /// `each` on `range` of the shard's bytes, a part at a time where a mapped file's part can
    /// be let go once used (`last`): parts of whole `elem`-byte values, at most `PART` bytes.
    fn read_parts(
        &self,
        (shard, info): (&Shard, &Info),
        name: &str,
        range: Range<u64>,
        last: bool,
        elem: u64,
        mut each: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        match &shard.data {
            Data::Whole(bytes) if last => {
                let part = (PART / elem).max(1) * elem;
                for start in (range.start..range.end).step_by(part as usize) {
                    let piece = start..(start + part).min(range.end);
                    each(within(bytes, &piece))?;
                    bytes.release(piece.start as usize..piece.end as usize);
                }
                Ok(())
            }
            _ => self.read((shard, info), name, range, last, each),
        }
    }

    /// `use_bytes` on `range` of the shard's bytes, let go once `last` is read.
    fn read<T>(
        &self,
        (shard, info): (&Shard, &Info),
        name: &str,
        range: Range<u64>,
        last: bool,
        use_bytes: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        match &shard.data {
            Data::Whole(bytes) => {
                let t = use_bytes(within(bytes, &range))?;
                if last {
                    bytes.release(range.start as usize..range.end as usize);
                }
                Ok(t)
            }
            Data::Ranged(staged) => staged.with(&info.extent, range, name, last, use_bytes),
        }
    }

    fn missing(&self, name: &str) -> Error {
        let files: Vec<_> = self.shards.iter().map(|s| s.name.as_str()).collect();
        Error::file(files.join(", "), format!("tensor {name} is missing"))
    }
}

impl TensorSource for Safetensors {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.check_tensor(name, shape)?;
        let found = self.locate(name)?;
        let extent = found.1.extent.clone();
        let t = self.values(found, name, shape.to_vec(), extent, true)?;
        Ok(Weight::Dense(t))
    }

    fn fetch<'a>(&'a self, name: &'a str, shape: &'a [usize]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_tensor(name, shape)?;
            let (shard, info) = self.locate(name)?;
            match &shard.data {
                Data::Ranged(staged) => staged.fetch(info.extent.clone(), name).await,
                Data::Whole(_) => Ok(()),
            }
        })
    }

    fn stored_f16_bytes(
        &self,
        name: &str,
        shape: &[usize],
        in_place: bool,
    ) -> Result<Option<StoredBytes>> {
        self.check_tensor(name, shape)?;
        let found = self.locate(name)?;
        if found.1.dtype != Dtype::F16 {
            return Ok(None);
        }
        let extent = found.1.extent.clone();
        if let (true, Data::Whole(bytes)) = (in_place, &found.0.data) {
            let range = extent.start as usize..extent.end as usize;
            return StoredBytes::shared(bytes.clone(), range).map(Some);
        }
        let mut values = Vec::with_capacity((extent.end - extent.start) as usize);
        self.read_parts(found, name, extent, true, 2, |raw| {
            values.extend_from_slice(raw);
            Ok(())
        })?;
        Ok(Some(StoredBytes::owned(values)))
    }

    fn dense_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
    ) -> Result<Option<Tensor>> {
        self.check_tensor(name, shape)?;
        let found = self.locate(name)?;
        let [total, cols] = shape else {
            return Ok(None);
        };
        if rows.start > rows.end || rows.end > *total {
            return Err(Error::input(format!(
                "rows {rows:?} of the {total}-row tensor {name}"
            )));
        }
        let row_bytes = (cols * found.1.dtype.bitsize() / 8) as u64;
        let start = found.1.extent.start;
        let part = start + rows.start as u64 * row_bytes..start + rows.end as u64 * row_bytes;
        let last = rows.end == *total;
        let t = self.values(found, name, vec![rows.len(), *cols], part, last)?;
        Ok(Some(t))
    }

    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        let (shard, info) = self.locate(name)?;
        if info.shape != shape {
            return Err(Error::file(
                &shard.name,
                format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    info.shape
                ),
            ));
        }
        match info.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(()),
            other => Err(Error::file(
                &shard.name,
                format!("tensor {name} has dtype {other:?}; only F32, F16 and BF16 are supported"),
            )),
        }
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        let mut out: Vec<StoredTensor> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.tensors.iter().map(|(name, info)| StoredTensor {
                    name: name.clone(),
                    shape: info.shape.clone(),
                    dtype: format!("{:?}", info.dtype),
                    bytes: info.extent.end - info.extent.start,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
