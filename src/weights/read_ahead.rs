//! Every tensor a model needs, fetched and read ahead one at a time: what a loader that reads
//! synchronously (the CPU model) needs from a source that fetches (a streamed checkpoint).
//! Only one tensor's raw bytes are held at a time; the values kept are the ones the model
//! holds anyway, and each is handed over once (taken, not cloned): a model that converts a
//! tensor (our q8_0 kernel repacks its blocks) frees the read one as it goes, so the two
//! forms of the weights are never all held at once (the browser's memory never shrinks).

use std::cell::RefCell;
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::model::{expected_tensors, PhiConfig, StoredTensor, TensorSource, Weight};

pub struct ReadAhead {
    tensors: RefCell<HashMap<String, Weight>>,
    stored: Vec<StoredTensor>,
}

impl ReadAhead {
    /// Fetches and reads every tensor of a model of `cfg` from `src`, telling `on_tensor` the
    /// name of each as it starts.
    pub async fn read(
        src: &dyn TensorSource,
        cfg: &PhiConfig,
        on_tensor: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let expected = expected_tensors(cfg);
        src.check(&expected)?;
        let mut tensors = HashMap::with_capacity(expected.len());
        for (name, shape) in expected {
            on_tensor(&name);
            src.fetch(&name, &shape).await?;
            let weight = src.tensor(&name, &shape)?;
            tensors.insert(name, weight);
        }
        Ok(Self {
            tensors: RefCell::new(tensors),
            stored: src.stored_tensors(),
        })
    }
}

impl TensorSource for ReadAhead {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.check_tensor(name, shape)?;
        self.tensors
            .borrow_mut()
            .remove(name)
            .ok_or_else(|| Error::input(format!("tensor {name} was read twice")))
    }

    fn check_tensor(&self, name: &str, shape: &[usize]) -> Result<()> {
        let dims = match self.tensors.borrow().get(name) {
            Some(Weight::Dense(t)) => t.dims().to_vec(),
            Some(Weight::Quantized(q)) => q.shape().dims().to_vec(),
            None => {
                return Err(Error::input(format!(
                    "tensor {name} was not read ahead, or was handed over already"
                )))
            }
        };
        if dims != shape {
            return Err(Error::input(format!(
                "tensor {name} was read as {dims:?}, asked for as {shape:?}"
            )));
        }
        Ok(())
    }

    fn stored_tensors(&self) -> Vec<StoredTensor> {
        self.stored.clone()
    }
}
