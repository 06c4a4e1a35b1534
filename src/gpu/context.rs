//! Acquiring a GPU and moving bytes to and from it.

use std::sync::{Arc, Mutex};

use super::tensor::{GpuTensor, WeightFormat};
use crate::error::{Error, Result};

/// What the adapter is and offers, for `medphi gpu-info` and the page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuInfo {
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    /// The widest subgroup the adapter may run (0 without subgroups).
    pub subgroup_max_size: u32,
}

/// Bytes copied into a new buffer per mapped view (a multiple of wgpu's 8-byte map alignment).
const UPLOAD_SLICE: usize = 16 << 20;

/// Buffers are whole multiples of this many bytes, so kernels can bind them as vec4 arrays.
const VEC4: usize = 16;

pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: GpuInfo,
    /// The first validation or out-of-memory error the device reported. wgpu's default
    /// handler panics, which would kill the wasm module; we turn it into an `Error` at the
    /// next readback instead.
    fault: Arc<Mutex<Option<String>>>,
    /// The readback buffer, reused and grown to the largest read so far: decode reads the
    /// same 4 bytes (or one logits row) every token, and scoring's varied sizes must not
    /// each keep a buffer alive.
    staging: Mutex<Option<wgpu::Buffer>>,
}

impl GpuContext {
    /// Requests the best adapter and a device with the adapter's own limits: a 2.7B model
    /// needs far more than WebGPU's 128/256 MiB defaults.
    pub async fn new() -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::gpu(format!("no GPU adapter: {e}")))?;
        let limits = adapter.limits();
        let optional = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        let features = adapter.features() & optional;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("medphi"),
                required_features: features,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::gpu(format!("cannot open the GPU device: {e}")))?;
        let a = adapter.get_info();
        let info = GpuInfo {
            adapter: a.name,
            backend: format!("{:?}", a.backend),
            device_type: format!("{:?}", a.device_type),
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_max_size: a.subgroup_max_size,
        };
        let fault = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&fault);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| e.to_string());
            }
        }));
        Ok(Self {
            device,
            queue,
            info,
            fault,
            staging: Mutex::new(None),
        })
    }

    /// The device's first uncaptured error, if any, as an `Error`.
    pub fn check_fault(&self) -> Result<()> {
        match self.fault.lock().ok().and_then(|mut f| f.take()) {
            Some(msg) => Err(Error::gpu(msg)),
            None => Ok(()),
        }
    }

    /// Errors, naming `what` and the limit, if `bytes` cannot be bound as one storage buffer.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        let limit = self
            .info
            .max_storage_buffer_binding_size
            .min(self.info.max_buffer_size);
        if bytes > limit {
            return Err(Error::gpu(format!(
                "{what} needs {bytes} bytes in one buffer, the adapter allows {limit} (max_storage_buffer_binding_size)"
            )));
        }
        Ok(())
    }

    /// An f32 tensor of `shape` holding `data`.
    pub fn upload(&self, label: &str, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_bytes(label, bytemuck::cast_slice(data), shape, WeightFormat::F32)
    }

    /// A tensor of `shape` whose values are `bytes` in `format` as a checkpoint stores them
    /// (rows of the last dimension; GGML blocks as llama.cpp writes them), in the layout the
    /// kernels read (`WeightFormat::device_bytes`), zero-padded to whole 16-byte vec4s.
    pub fn upload_bytes(
        &self,
        label: &str,
        bytes: &[u8],
        shape: &[usize],
        format: WeightFormat,
    ) -> Result<GpuTensor> {
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape.iter().product::<usize>() / cols.max(1);
        if bytes.len() != rows * format.row_bytes(cols) {
            return Err(Error::gpu(format!(
                "{label}: {} bytes are not a {shape:?} tensor in {format:?}",
                bytes.len()
            )));
        }
        let contents = format.device_bytes(bytes, rows, cols);
        let size = contents.len().max(1).next_multiple_of(VEC4);
        self.check_binding(label, size as u64)?;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        // Mapped at creation, not `queue.write_buffer`: Chromium sends written bytes through
        // its command stream, and a renderer that has filled it waits synchronously for the
        // GPU process (a mapped buffer's bytes go by shared memory instead). Copied a slice
        // at a time, because the browser stages each mapped view in wasm memory: a whole
        // 524 MB output layer would be held there twice. The padding past the bytes reads as
        // zeros, as every new buffer does.
        for start in (0..contents.len()).step_by(UPLOAD_SLICE) {
            let end = (start + UPLOAD_SLICE).min(contents.len());
            let view_end = end.next_multiple_of(4) as u64;
            let mut view = buffer
                .slice(start as u64..view_end)
                .get_mapped_range_mut()
                .map_err(|e| Error::gpu(format!("{label}: cannot map the new buffer: {e:?}")))?;
            view.slice(..end - start)
                .copy_from_slice(&contents[start..end]);
        }
        buffer.unmap();
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            format,
        })
    }

    /// An f32 tensor of `shape`, zero-filled (padded to whole vec4s).
    pub fn zeros(&self, label: &str, shape: &[usize]) -> Result<GpuTensor> {
        let len: usize = shape.iter().product();
        let size = (len.max(1) * 4).next_multiple_of(VEC4) as u64;
        self.check_binding(label, size)?;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            format: WeightFormat::F32,
        })
    }

    /// Copies the first `len` f32s back from `tensor`. Awaits the map in the browser;
    /// natively the same future is driven by blocking on the device.
    pub async fn read(&self, tensor: &GpuTensor, len: usize) -> Result<Vec<f32>> {
        self.read_as::<f32>(tensor, len).await
    }

    fn staging_buffer(&self, size: u64) -> wgpu::Buffer {
        let mut slot = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(b) if b.size() >= size => b.clone(),
            _ => {
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                *slot = Some(b.clone());
                b
            }
        }
    }

    /// Copies the first `len` values of type `T` (f32, u32) back from `tensor`.
    pub async fn read_as<T: bytemuck::Pod>(
        &self,
        tensor: &GpuTensor,
        len: usize,
    ) -> Result<Vec<T>> {
        let buffer = &tensor.buffer;
        let size = (len * std::mem::size_of::<T>()) as u64;
        let staging = self.staging_buffer(size);
        // A failed copy leaves the map pending forever in the browser, so its validation
        // result is awaited first and turned into an error.
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        if let Some(e) = scope.pop().await {
            return Err(Error::gpu(format!("cannot read back {size} bytes: {e}")));
        }
        let data = self.map_and_read(&staging, size).await;
        if data.is_err() {
            // A buffer whose map failed cannot be trusted for the next readback.
            *self.staging.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let data = data?;
        self.check_fault()?;
        Ok(data)
    }

    /// Maps the first `size` bytes of `staging` and copies them out.
    async fn map_and_read<T: bytemuck::Pod>(
        &self,
        staging: &wgpu::Buffer,
        size: u64,
    ) -> Result<Vec<T>> {
        let (tx, rx) = futures_channel::oneshot::channel();
        staging
            .slice(..size)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::gpu(format!("waiting for the GPU failed: {e}")))?;
        rx.await
            .map_err(|_| Error::gpu("the GPU readback was dropped"))?
            .map_err(|e| Error::gpu(format!("cannot map the readback buffer: {e}")))?;
        let view = staging
            .slice(..size)
            .get_mapped_range()
            .map_err(|e| Error::gpu(format!("cannot read the mapped buffer: {e:?}")))?;
        let data = bytemuck::pod_collect_to_vec::<u8, T>(&view);
        drop(view);
        staging.unmap();
        Ok(data)
    }
}
