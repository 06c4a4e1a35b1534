//! safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (as `save_pretrained` writes them).

use std::collections::HashMap;

use ::safetensors::tensor::{Dtype, Metadata, TensorView};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Bytes, StoredTensor, TensorSource, Weight};
use crate::error::{Error, Result};

struct Shard {
    name: String,
    bytes: Bytes,
    header_len: usize,
    metadata: Metadata,
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

impl Safetensors {
    /// Parses and validates the header of each file; `dtype` is the compute dtype that
    /// tensors are converted to when read.
    pub fn from_shards(files: Vec<(String, Bytes)>, dtype: DType) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::input("no safetensors files given"));
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (name, bytes) in files {
            if bytes.is_empty() {
                return Err(Error::file(&name, "file is empty"));
            }
            let (header_len, metadata) = ::safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| Error::file(&name, format!("not a valid safetensors file: {e}")))?;
            for tensor in metadata.tensors().keys() {
                if index.insert(tensor.clone(), shards.len()).is_some() {
                    return Err(Error::file(
                        &name,
                        format!("tensor {tensor} appears in more than one shard"),
                    ));
                }
            }
            shards.push(Shard {
                name,
                bytes,
                header_len,
                metadata,
            });
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
    fn view(&self, name: &str) -> Result<(&Shard, TensorView<'_>, std::ops::Range<usize>)> {
        let shard_idx = *self.index.get(name).ok_or_else(|| self.missing(name))?;
        let shard = &self.shards[shard_idx];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| self.missing(name))?;
        let (start, end) = info.data_offsets;
        let base = 8 + shard.header_len;
        // read_metadata has checked that the offsets lie within the buffer.
        let extent = base + start..base + end;
        let data = &shard.bytes[extent.clone()];
        let view = TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| Error::file(&shard.name, format!("tensor {name}: {e}")))?;
        Ok((shard, view, extent))
    }

    fn missing(&self, name: &str) -> Error {
        let files: Vec<_> = self.shards.iter().map(|s| s.name.as_str()).collect();
        Error::file(files.join(", "), format!("tensor {name} is missing"))
    }
}

impl TensorSource for Safetensors {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.check_tensor(name, shape)?;
        let (shard, view, extent) = self.view(name)?;
        let tensor = view
            .load(&Device::Cpu)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| Error::file(&shard.name, format!("tensor {name}: {e}")))?;
        // `load` copied the values out of the file's bytes.
        shard.bytes.release(extent);
        Ok(Weight::Dense(tensor))
    }

    fn dense_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Option<Tensor>> {
        self.check_tensor(name, shape)?;
        let (shard, view, extent) = self.view(name)?;
        let [total, cols] = shape else {
            return Ok(None);
        };
        if rows.start > rows.end || rows.end > *total {
            return Err(Error::input(format!(
                "rows {rows:?} of the {total}-row tensor {name}"
            )));
        }
        let row_bytes = cols * view.dtype().bitsize() / 8;
        let part = extent.start + rows.start * row_bytes..extent.start + rows.end * row_bytes;
        let bad = |e: String| Error::file(&shard.name, format!("tensor {name}: {e}"));
        let block = TensorView::new(
            view.dtype(),
            vec![rows.len(), *cols],
            &shard.bytes[part.clone()],
        )
        .map_err(|e| bad(e.to_string()))?;
        let tensor = block
            .load(&Device::Cpu)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| bad(e.to_string()))?;
        shard.bytes.release(part);
        Ok(Some(tensor))
    }

    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        let (shard, view, _) = self.view(name)?;
        if view.shape() != shape {
            return Err(Error::file(
                &shard.name,
                format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    view.shape()
                ),
            ));
        }
        match view.dtype() {
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
                s.metadata
                    .tensors()
                    .into_iter()
                    .map(|(name, info)| StoredTensor {
                        name,
                        shape: info.shape.clone(),
                        dtype: format!("{:?}", info.dtype),
                    })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
