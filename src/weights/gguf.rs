//! GGUF files of the `phi2` architecture, as llama.cpp's `convert_hf_to_gguf.py` and
//! `llama-quantize` write them. Tensors keep their GGML block layout (q4_0, q8_0, k-quants…)
//! and are multiplied by our kernels (q8_0, q4_0: `model::quant_matmul`) or candle's
//! quantized matmul; names are mapped to Hugging Face's.
//! A file is either all at hand (memory-mapped, or bytes the browser read whole) or read by
//! ranges: its header first, then each tensor as it is fetched, so a GGUF larger than the
//! tab's memory can stream to the GPU.

use std::rc::Rc;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};

use super::gguf_file::{GgufFile, MetaValue, Parsed, TensorInfo};
use super::range_read::{read_exact, Staged};
use super::{Bytes, RangeRead, StoredTensor, TensorSource, Weight};
use crate::error::{Error, Result};
use crate::model::names::{Site, TensorId};
#[cfg(quant_kernels)]
use crate::model::quant_matmul::QuantMatrix;
#[cfg(native_kernels)]
use crate::model::stored::StoredBytes;
use crate::model::{Activation, BoxFuture, PhiConfig};

/// How much of a ranged file is read first for its header; more is read (at least doubling)
/// while the header goes on. Phi-2's, with its 51,200 tokens and 50,000 merges, is ~2 MB.
const FIRST_READ: u64 = 1 << 20;
/// A header (metadata and tensor table) longer than this is refused: it is held in memory
/// for the whole load, and real ones are a few MB.
const MAX_HEADER: u64 = 256 << 20;

/// Where the file's bytes are.
enum Data {
    /// Shared with the matrices used in place (`stored_quantized`), which keep it alive.
    Whole(Arc<Bytes>),
    /// Read by ranges: `header` holds the file's first bytes (metadata and tensor table,
    /// which the metadata arrays are decoded from), tensors are staged as they are fetched.
    Ranged { header: Vec<u8>, tensors: Staged },
}

pub struct Gguf {
    name: String,
    data: Data,
    file: GgufFile,
    dtype: DType,
}

impl Gguf {
    pub fn from_bytes(name: String, bytes: Bytes, dtype: DType) -> Result<Self> {
        if bytes.is_empty() {
            return Err(Error::file(&name, "file is empty"));
        }
        let file = GgufFile::parse(&bytes).map_err(|e| invalid(&name, e))?;
        Self::new(name, Data::Whole(Arc::new(bytes)), file, dtype)
    }

    /// Reads only the header; tensors are read by ranges as they are fetched.
    pub async fn from_ranged(name: String, file: Rc<dyn RangeRead>, dtype: DType) -> Result<Self> {
        let len = file.size();
        if len == 0 {
            return Err(Error::file(&name, "file is empty"));
        }
        let mut want = FIRST_READ.min(len);
        loop {
            let header = read_exact(&*file, &name, 0..want, "the header").await?;
            match GgufFile::parse_prefix(&header, len).map_err(|e| invalid(&name, e))? {
                Parsed::Header(parsed) => {
                    let data = Data::Ranged {
                        header,
                        tensors: Staged::new(name.clone(), file),
                    };
                    return Self::new(name, data, parsed, dtype);
                }
                Parsed::NeedBytes(need) => {
                    let need = (need as u64).max(want.saturating_mul(2)).min(len);
                    if need > MAX_HEADER {
                        return Err(invalid(
                            &name,
                            format!("its metadata and tensor table run past the first {MAX_HEADER} bytes"),
                        ));
                    }
                    want = need;
                }
            }
        }
    }

    fn new(name: String, data: Data, file: GgufFile, dtype: DType) -> Result<Self> {
        let gguf = Self {
            name,
            data,
            file,
            dtype,
        };
        let arch = gguf.meta_str("general.architecture")?;
        if arch != "phi2" {
            return Err(Error::file(
                &gguf.name,
                format!("GGUF architecture is {arch:?}, only \"phi2\" is supported"),
            ));
        }
        Ok(gguf)
    }

    fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.file.metadata.get(key)
    }

    fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta(key) {
            Some(MetaValue::String(s)) => Ok(s),
            Some(_) => Err(Error::file(
                &self.name,
                format!("metadata {key} is not a string"),
            )),
            None => Err(Error::file(
                &self.name,
                format!("metadata {key} is missing"),
            )),
        }
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::Int(n)) => usize::try_from(*n).map(Some).map_err(|_| {
                Error::file(
                    &self.name,
                    format!("metadata {key} = {n} is not a usable non-negative integer"),
                )
            }),
            Some(_) => Err(Error::file(
                &self.name,
                format!("metadata {key} is not an integer"),
            )),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::F32(v)) => Ok(Some(f64::from(*v))),
            Some(MetaValue::F64(v)) => Ok(Some(*v)),
            Some(_) => Err(Error::file(
                &self.name,
                format!("metadata {key} is not a float"),
            )),
        }
    }

    /// A metadata array decoded by `decode` (strings or integers).
    fn meta_array<T>(
        &self,
        key: &str,
        decode: impl Fn(&super::gguf_file::GgufArray, &[u8]) -> std::result::Result<T, String>,
    ) -> Result<Option<T>> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => decode(a, self.header())
                .map(Some)
                .map_err(|e| Error::file(&self.name, format!("metadata {key}: {e}"))),
            Some(_) => Err(Error::file(
                &self.name,
                format!("metadata {key} is not an array"),
            )),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .ok_or_else(|| Error::file(&self.name, format!("metadata {key} is missing")))
    }

    /// The model configuration recorded in the `phi2.*` metadata.
    pub fn config(&self) -> Result<PhiConfig> {
        let hidden_size = self.required("phi2.embedding_length")?;
        let heads = self.required("phi2.attention.head_count")?;
        let rope_dims = self.required("phi2.rope.dimension_count")?;
        let embedding = Site::Embedding.weight().gguf();
        let vocab_size = match self.file.tensors.get(&embedding) {
            Some(info) => info.shape.first().copied().unwrap_or(0),
            None => {
                return Err(Error::file(
                    &self.name,
                    format!("tensor {embedding} is missing"),
                ))
            }
        };
        let head_dim = hidden_size.checked_div(heads).unwrap_or(0);
        let config = PhiConfig {
            vocab_size,
            hidden_size,
            intermediate_size: self.required("phi2.feed_forward_length")?,
            num_hidden_layers: self.required("phi2.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: self
                .meta_usize("phi2.attention.head_count_kv")?
                .unwrap_or(heads),
            max_position_embeddings: self.required("phi2.context_length")?,
            layer_norm_eps: self
                .meta_f64("phi2.attention.layer_norm_epsilon")?
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64("phi2.rope.freq_base")?.unwrap_or(10_000.0),
            partial_rotary_factor: if head_dim == 0 {
                0.0
            } else {
                rope_dims as f64 / head_dim as f64
            },
            hidden_act: Activation::GeluTanh,
            tie_word_embeddings: false,
            bos_token_id: self
                .meta_usize("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos_token_id: self
                .meta_usize("tokenizer.ggml.eos_token_id")?
                .map(|v| v as u32),
        };
        config
            .validate()
            .map_err(|e| Error::file(&self.name, format!("GGUF metadata: {e}")))?;
        if config.rotary_dim() != rope_dims {
            return Err(Error::file(
                &self.name,
                format!("phi2.rope.dimension_count {rope_dims} does not fit head size {head_dim}"),
            ));
        }
        Ok(config)
    }

    /// The embedded GPT-2 style tokenizer, if the converter stored one.
    pub fn tokenizer_json(&self) -> Result<Option<String>> {
        let Some(model) = self.meta("tokenizer.ggml.model") else {
            return Ok(None);
        };
        if !matches!(model, MetaValue::String(s) if s == "gpt2") {
            return Err(Error::file(
                &self.name,
                "only the gpt2 (byte-level BPE) GGUF tokenizer is supported",
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            self.meta_array(key, |a, b| a.strings(b))?
                .ok_or_else(|| Error::file(&self.name, format!("metadata {key} is missing")))
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> =
            match self.meta_array("tokenizer.ggml.token_type", |a, b| a.ints(b))? {
                Some(types) => types
                    .into_iter()
                    .map(|t| i64::try_from(t).unwrap_or(1))
                    .collect(),
                None => vec![1; tokens.len()],
            };
        crate::tokenizer::byte_level_bpe_json(&tokens, &types, &merges)
            .map(Some)
            .map_err(|e| Error::file(&self.name, format!("embedded tokenizer: {e}")))
    }

    /// The bytes the metadata arrays lie in.
    fn header(&self) -> &[u8] {
        match &self.data {
            Data::Whole(bytes) => bytes,
            Data::Ranged { header, .. } => header,
        }
    }

    /// Tensor `gguf` as stored. After its `last` read its bytes are let go: a mapped file's
    /// pages leave memory, a ranged file's staged copy is dropped.
    fn read(&self, gguf: &str, last: bool) -> Result<QTensor> {
        let info = self.info(gguf)?;
        self.with_bytes(gguf, last, |bytes| {
            qtensor(info.dtype, bytes, info.shape.clone())
                .map_err(|e| Error::file(&self.name, format!("tensor {gguf}: {e}")))
        })
    }

    /// `use_bytes` on tensor `gguf`'s stored bytes; `last`: nothing reads them again, so
    /// they are let go.
    fn with_bytes<T>(
        &self,
        gguf: &str,
        last: bool,
        use_bytes: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let info = self.info(gguf)?;
        match &self.data {
            Data::Whole(bytes) => {
                // `parse` has checked that the range lies within the file (whose bytes
                // these are) and fits type and shape.
                let range = info.bytes.start as usize..info.bytes.end as usize;
                let out = use_bytes(&bytes[range.clone()])?;
                if last {
                    bytes.release(range);
                }
                Ok(out)
            }
            Data::Ranged { tensors, .. } => {
                tensors.with(&info.bytes, info.bytes.clone(), gguf, last, use_bytes)
            }
        }
    }

    fn info(&self, gguf: &str) -> Result<&TensorInfo> {
        self.file
            .tensors
            .get(gguf)
            .ok_or_else(|| Error::file(&self.name, format!("tensor {gguf} is missing")))
    }

    /// Resolves a Hugging Face name. Old phi2 GGUFs (from the original `Wqkv` layout) store
    /// q, k and v fused as `attn_qkv`; those are split by rows, which keeps GGML blocks whole.
    fn locate(&self, hf: &str) -> Result<Located> {
        let id = TensorId::from_hf(hf)
            .ok_or_else(|| Error::file(&self.name, format!("no GGUF name for tensor {hf}")))?;
        let name = id.gguf();
        if self.file.tensors.contains_key(&name) {
            return Ok(Located::Whole(name));
        }
        if let Some((fused, _)) = id.gguf_fused() {
            if self.file.tensors.contains_key(&fused) {
                let (rows, shape) = id.fused_rows(&self.config()?).expect("q, k or v");
                return Ok(Located::Rows {
                    name: fused,
                    rows,
                    shape,
                });
            }
        }
        Err(Error::file(
            &self.name,
            format!("tensor {name} (for {hf}) is missing"),
        ))
    }
}

enum Located {
    Whole(String),
    /// `rows` of the fused tensor `name`, whose whole shape is `shape`.
    Rows {
        name: String,
        rows: std::ops::Range<usize>,
        shape: Vec<usize>,
    },
}

/// A quantized tensor from its GGML bytes. candle reinterprets them as blocks in place, so
/// bytes that are not aligned for the block type (a file may use any alignment) are copied
/// into an aligned buffer first.
pub(super) fn qtensor(
    dtype: GgmlDType,
    data: &[u8],
    shape: Vec<usize>,
) -> candle_core::Result<QTensor> {
    const ALIGN: usize = std::mem::align_of::<u64>();
    if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        return candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            data,
            shape,
            &Device::Cpu,
        );
    }
    let mut aligned = vec![0u64; data.len().div_ceil(ALIGN)];
    let buf = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..data.len()];
    buf.copy_from_slice(data);
    candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, buf, shape, &Device::Cpu)
}

/// Rows `start..start+rows` of a 2-D quantized tensor, as a new tensor of the same type.
fn slice_rows(q: &QTensor, start: usize, rows: usize) -> candle_core::Result<QTensor> {
    let (total, cols) = q.shape().dims2()?;
    let dtype: GgmlDType = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if start + rows > total || data.len() != total * row_bytes {
        candle_core::bail!(
            "cannot take rows {start}..{} of a {total}-row tensor",
            start + rows
        )
    }
    qtensor(
        dtype,
        &data[start * row_bytes..(start + rows) * row_bytes],
        vec![rows, cols],
    )
}

impl TensorSource for Gguf {
    fn tensor(&self, hf: &str, shape: &[usize]) -> Result<Weight> {
        self.check_tensor(hf, shape)?;
        let q = match self.locate(hf)? {
            Located::Whole(name) => self.read(&name, true)?,
            Located::Rows {
                name,
                rows,
                shape: fused,
            } => {
                // q, k and v each read the fused tensor; the last of them lets it go.
                let whole = self.read(&name, fused.first() == Some(&rows.end))?;
                if shape.len() == 1 {
                    let t = whole
                        .dequantize(&Device::Cpu)?
                        .narrow(0, rows.start, rows.len())?;
                    return Ok(Weight::Dense(t.to_dtype(self.dtype)?));
                }
                slice_rows(&whole, rows.start, rows.len())
                    .map_err(|e| Error::file(&self.name, format!("tensor {name}: {e}")))?
            }
        };
        // Matrices stay quantized; 1-D tensors (norms, biases) are tiny and used densely.
        // candle's CPU dot products for q4_1, q5_0 and q5_1 assert an even number of blocks
        // per row (ggml's old SIMD requirement; a panic in debug builds) although their
        // generic code handles any: such rare matrices (found by fuzzing) are used densely.
        let odd_blocks = matches!(
            q.dtype(),
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
        ) && (shape[shape.len() - 1] / q.dtype().block_size()) % 2 == 1;
        if shape.len() == 1 || matches!(q.dtype(), GgmlDType::F32) || odd_blocks {
            Ok(Weight::Dense(
                q.dequantize(&Device::Cpu)?.to_dtype(self.dtype)?,
            ))
        } else {
            Ok(Weight::Quantized(Arc::new(q)))
        }
    }

    #[cfg(quant_kernels)]
    fn stored_quantized(&self, hf: &str, shape: &[usize]) -> Result<Option<QuantMatrix>> {
        self.check_tensor(hf, shape)?;
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        // q, k and v of a fused `attn_qkv` are its rows; each reads only its own.
        let (name, first, last) = match self.locate(hf)? {
            Located::Whole(name) => (name, 0, true),
            Located::Rows { name, rows, shape } => {
                let last = shape.first() == Some(&rows.end);
                (name, rows.start, last)
            }
        };
        let info = self.info(&name)?;
        let dtype = info.dtype;
        if !QuantMatrix::serves(dtype) {
            return Ok(None);
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let mine = first * row_bytes..(first + rows) * row_bytes;
        if mine.end > info.bytes.end.saturating_sub(info.bytes.start) as usize {
            return Err(Error::file(
                &self.name,
                format!("tensor {name} is too short"),
            ));
        }
        // A whole file (mapped, natively) is used where it lies: loading copies nothing and
        // its pages stay the page cache's, never released.
        #[cfg(native_kernels)]
        if let Data::Whole(bytes) = &self.data {
            let start = info.bytes.start as usize;
            let blocks = StoredBytes::shared(bytes.clone(), start + mine.start..start + mine.end)?;
            return QuantMatrix::in_place(dtype, blocks, rows, cols);
        }
        self.with_bytes(&name, last, |bytes| {
            QuantMatrix::for_this_cpu(dtype, &bytes[mine], rows, cols)
        })
    }

    fn fetch<'a>(&'a self, hf: &'a str, shape: &'a [usize]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_tensor(hf, shape)?;
            let Data::Ranged { tensors, .. } = &self.data else {
                return Ok(());
            };
            let name = match self.locate(hf)? {
                Located::Whole(name) | Located::Rows { name, .. } => name,
            };
            tensors.fetch(self.info(&name)?.bytes.clone(), &name).await
        })
    }

    fn check_tensor(&self, hf: &str, shape: &[usize]) -> Result<()> {
        let located = self.locate(hf)?;
        let (name, expected) = match &located {
            Located::Whole(name) => (name, shape.to_vec()),
            Located::Rows { name, shape, .. } => (name, shape.clone()),
        };
        let info = &self.file.tensors[name];
        if info.shape != expected {
            return Err(Error::file(
                &self.name,
                format!(
                    "tensor {name} has shape {:?}, the config implies {expected:?}",
                    info.shape
                ),
            ));
        }
        let cols = *expected.last().unwrap_or(&1);
        if cols % info.dtype.block_size() != 0 {
            return Err(Error::file(
                &self.name,
                format!(
                    "tensor {name}: row length {cols} is not a multiple of the {:?} block size",
                    info.dtype
                ),
            ));
        }
        Ok(())
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        // Sorted by name: the table is a BTreeMap.
        self.file
            .tensors
            .iter()
            .map(|(name, info)| StoredTensor {
                name: name.clone(),
                shape: info.shape.clone(),
                dtype: format!("{:?}", info.dtype),
                bytes: info.bytes.end - info.bytes.start,
            })
            .collect()
    }
}

fn invalid(name: &str, e: impl std::fmt::Display) -> Error {
    Error::file(name, format!("not a valid GGUF file: {e}"))
}
