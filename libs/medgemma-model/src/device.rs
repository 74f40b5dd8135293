//! Device selection: `cpu`, `cuda` or `cuda:N`, as every binary's `--device` flag spells it.
//!
//! Opening a device never panics: a build without the `cuda` feature, a machine without the
//! NVIDIA driver, or an ordinal beyond the devices present each give a [`ModelError::Device`]
//! that says what to do. On CUDA the default dtype is bf16 (Gemma 3's own); on CPU f32.

use candle_core::Device;

use crate::error::{ModelError, Result};
use crate::model::ModelDType;

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA device by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(Self::Cuda).map_err(|_| {
                    ModelError::Device(format!(
                        "device {s:?}: expected cuda:N with N a device ordinal (0, 1, ...)"
                    ))
                }),
                None => Err(ModelError::Device(format!(
                    "unknown device {s:?} (expected cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this binary was built with CUDA support (`--features cuda`).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// Parses and opens a `--device` value.
    pub fn open_str(s: &str) -> Result<Device> {
        s.parse::<Self>()?.open()
    }

    /// Opens the device: a clear error, never a panic, when it is not there.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
        }
    }

    /// The dtype a model runs in on this device unless one is asked for: bf16 on CUDA (the
    /// dtype Gemma 3 was trained in; half the weight and KV bytes of f32), f32 on CPU (where
    /// candle's bf16 matmul converts the weights on every call).
    pub fn default_dtype(self) -> ModelDType {
        match self {
            Self::Cpu => ModelDType::F32,
            Self::Cuda(_) => ModelDType::BF16,
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    Err(ModelError::Device(format!(
        "device cuda:{n}: this binary was built without CUDA support; build it with \
         `--features cuda` (see the README, GPU) or use --device cpu"
    )))
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    // cudarc reports a missing driver or device as an error; guard against a panic from
    // deeper in the stack all the same, so a misconfigured node logs one clear line.
    let count = std::panic::catch_unwind(CudaContext::device_count)
        .map_err(|_| no_driver(n, "the CUDA driver library could not be loaded"))?
        .map_err(|e| no_driver(n, &e.to_string()))?;
    let count = usize::try_from(count).unwrap_or(0);
    if n >= count {
        return Err(ModelError::Device(format!(
            "device cuda:{n}: {count} CUDA device(s) visible (check CUDA_VISIBLE_DEVICES and \
             the pod's GPU request)"
        )));
    }
    std::panic::catch_unwind(|| Device::new_cuda(n))
        .map_err(|_| no_driver(n, "the CUDA runtime panicked while opening the device"))?
        .map_err(|e| ModelError::Device(format!("device cuda:{n}: {e}")))
}

#[cfg(feature = "cuda")]
fn no_driver(n: usize, why: &str) -> ModelError {
    ModelError::Device(format!(
        "device cuda:{n}: no usable NVIDIA driver or GPU on this machine ({why}); use --device cpu"
    ))
}

/// Total and free bytes of the device's memory, `None` on the CPU.
pub fn memory_info(device: &Device) -> Result<Option<(usize, usize)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| ModelError::Device(format!("cuda memory info: {e}")))?;
            Ok(Some((total, free)))
        }
        _ => Ok(None),
    }
}

/// The device's name (`cpu` on the CPU).
pub fn name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "cuda".into()),
        _ => "cpu".into(),
    }
}

/// The device's peak memory bandwidth in GB/s from its memory clock and bus width (double
/// data rate); `None` on the CPU.
pub fn peak_bandwidth_gbs(device: &Device) -> Option<f64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
            let ctx = d.cuda_stream().context().clone();
            let clock_khz = ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
                .ok()?;
            let bus_bits = ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
                .ok()?;
            Some(peak_gbs(clock_khz as f64, bus_bits as f64))
        }
        _ => None,
    }
}

/// Peak bandwidth of a DDR memory clocked at `clock_khz` on a `bus_bits`-wide bus, GB/s.
pub fn peak_gbs(clock_khz: f64, bus_bits: f64) -> f64 {
    2.0 * clock_khz * 1e3 * bus_bits / 8.0 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(" CUDA ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["cuda:", "cuda:x", "cuda:-1", "tpu", "", "metal"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(matches!(e, ModelError::Device(_)), "{bad}: {e}");
            assert!(e.to_string().contains("cuda"), "{bad}: {e}");
        }
    }

    #[test]
    fn peak_bandwidth_from_clock_and_bus() {
        // A100 80GB: 1,593 MHz HBM2e on a 5,120-bit bus = 2,039 GB/s.
        assert!((peak_gbs(1_593_000.0, 5120.0) - 2039.0).abs() < 1.0);
        assert_eq!(peak_bandwidth_gbs(&Device::Cpu), None);
        assert_eq!(name(&Device::Cpu), "cpu");
    }

    #[test]
    fn default_dtype_is_bf16_on_cuda_only() {
        assert_eq!(DeviceSpec::Cpu.default_dtype(), ModelDType::F32);
        assert_eq!(DeviceSpec::Cuda(1).default_dtype(), ModelDType::BF16);
    }

    #[test]
    fn cpu_opens_and_has_no_device_memory() {
        let d = DeviceSpec::open_str("cpu").unwrap();
        assert!(d.is_cpu());
        assert_eq!(memory_info(&d).unwrap(), None);
    }

    /// `--device cuda` where there is no GPU (every CI and development machine): an error
    /// naming the device and what to do, not a panic. In a CUDA build on a machine with a GPU
    /// the device opens instead, and an ordinal past the last one is the error.
    #[test]
    fn cuda_without_a_device_is_a_clear_error() {
        let r = std::panic::catch_unwind(|| DeviceSpec::open_str("cuda:0"));
        let r = r.expect("opening cuda must not panic");
        match r {
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, ModelError::Device(_)), "{msg}");
                assert!(msg.contains("cuda:0"), "{msg}");
                if !CUDA_BUILD {
                    assert!(msg.contains("--features cuda"), "{msg}");
                }
            }
            Ok(d) => {
                assert!(CUDA_BUILD && d.is_cuda());
                let e = DeviceSpec::open_str("cuda:4096").unwrap_err();
                assert!(e.to_string().contains("cuda:4096"), "{e}");
            }
        }
    }
}
