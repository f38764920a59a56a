//! Which burn backend the worker computes on, chosen by cargo features.
//!
//! `cuda` wins when enabled; otherwise the pure-Rust CPU backend picked by
//! measurement (see BENCHMARKS.md) is used. Training always runs under
//! `Autodiff`; sampling and evaluation use the inner backend.

use burn::backend::Autodiff;

#[cfg(feature = "cuda")]
mod selected {
    /// NVIDIA GPUs through CubeCL.
    pub type Inner = burn::backend::Cuda;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "cuda";
}

#[cfg(all(not(feature = "cuda"), feature = "flex"))]
mod selected {
    /// burn's pure-Rust SIMD + rayon CPU backend.
    pub type Inner = burn::backend::Flex;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "flex";
}

#[cfg(all(not(feature = "cuda"), not(feature = "flex"), feature = "candle"))]
mod selected {
    /// Candle's CPU backend.
    pub type Inner = burn::backend::Candle;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "candle";
}

#[cfg(all(
    not(feature = "cuda"),
    not(feature = "flex"),
    not(feature = "candle"),
    feature = "ndarray"
))]
mod selected {
    /// ndarray's CPU backend.
    pub type Inner = burn::backend::NdArray;
    /// The backend's name in logs and benchmark lines.
    pub const NAME: &str = "ndarray";
}

#[cfg(not(any(
    feature = "cuda",
    feature = "flex",
    feature = "candle",
    feature = "ndarray"
)))]
compile_error!("enable one backend feature: flex (default), candle, ndarray or cuda");

pub use selected::{Inner, NAME};

/// The backend training runs on.
pub type TrainBackend = Autodiff<Inner>;

/// The device of the selected backend.
pub type Device = burn::tensor::Device<Inner>;

/// An amount of memory and what it counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Memory {
    /// Bytes.
    pub bytes: u64,
    /// `device_reserved` (the GPU memory pool's reservation) or `peak_rss`
    /// (the CPU process's resident high-water mark, tensors and all).
    pub kind: &'static str,
}

impl Memory {
    /// In MiB.
    pub fn mb(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64
    }
}

/// Tracks the most memory the backend held, sampled between steps.
pub struct MemoryWatch {
    peak: Option<Memory>,
    #[cfg(feature = "cuda")]
    device: Device,
}

impl MemoryWatch {
    /// Watches `device`.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn new(device: &Device) -> Self {
        Self {
            peak: None,
            #[cfg(feature = "cuda")]
            device: device.clone(),
        }
    }

    /// Takes one sample.
    pub fn sample(&mut self) {
        if let Some(now) = self.current()
            && self.peak.is_none_or(|p| now.bytes > p.bytes)
        {
            self.peak = Some(now);
        }
    }

    /// The largest sample, if the backend tells.
    pub fn peak(&self) -> Option<Memory> {
        self.peak
    }

    #[cfg(feature = "cuda")]
    fn current(&self) -> Option<Memory> {
        use cubecl::Runtime;
        let client = cubecl::cuda::CudaRuntime::client(&self.device);
        let usage = client.memory_usage().ok()?;
        Some(Memory {
            bytes: usage.bytes_reserved,
            kind: "device_reserved",
        })
    }

    /// The kernel's high-water mark is already a peak: sampling keeps it.
    #[cfg(not(feature = "cuda"))]
    fn current(&self) -> Option<Memory> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(Memory {
            bytes: kb * 1024,
            kind: "peak_rss",
        })
    }
}

/// What the backend computes on, for benchmark lines: the GPU's name, or
/// the CPU model.
pub fn device_name() -> String {
    #[cfg(feature = "cuda")]
    return cuda_device_name().unwrap_or_else(|e| format!("unknown CUDA device ({e})"));
    #[cfg(not(feature = "cuda"))]
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Device 0's name from the driver API (`cuDeviceGetName`), which the
/// process has loaded anyway.
#[cfg(feature = "cuda")]
fn cuda_device_name() -> Result<String, String> {
    use std::ffi::{CStr, c_char, c_int, c_uint};
    type Init = unsafe extern "C" fn(c_uint) -> c_int;
    type Get = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type Name = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    // SAFETY: libcuda's documented entry points with their C signatures;
    // the name buffer outlives the call and its length is passed along.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").map_err(|e| e.to_string())?;
        let init: libloading::Symbol<Init> = lib.get(b"cuInit").map_err(|e| e.to_string())?;
        let get: libloading::Symbol<Get> = lib.get(b"cuDeviceGet").map_err(|e| e.to_string())?;
        let name: libloading::Symbol<Name> =
            lib.get(b"cuDeviceGetName").map_err(|e| e.to_string())?;
        let mut device = 0;
        let mut buffer = [0 as c_char; 256];
        match (init(0), get(&mut device, 0)) {
            (0, 0) => {}
            codes => return Err(format!("driver error codes {codes:?}")),
        }
        match name(buffer.as_mut_ptr(), buffer.len() as c_int, device) {
            0 => Ok(CStr::from_ptr(buffer.as_ptr())
                .to_string_lossy()
                .into_owned()),
            code => Err(format!("cuDeviceGetName returned {code}")),
        }
    }
}

/// The device to train on, after checking it can actually be used.
///
/// burn's CUDA runtime panics on a background thread when `libcuda` is
/// missing; checking first turns that into an error a user can act on.
pub fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        cuda_driver_present()?;
        keep_kernels(&kernel_cache(|name| std::env::var_os(name)));
    }
    let given = |name: &str| std::env::var(name).ok();
    // A local coordinator gives each rank one GPU as CUDA_VISIBLE_DEVICES,
    // so the device is always the first the process sees.
    tracing::info!(
        backend = NAME,
        device = %device_name(),
        index = 0,
        cuda_visible_devices = ?given("CUDA_VISIBLE_DEVICES"),
        local_rank = ?given("LOCAL_RANK"),
        local_world_size = ?given("LOCAL_WORLD_SIZE"),
        "training device"
    );
    Ok(Device::default())
}

/// Where cubecl keeps what it learns about this machine's GPU, its
/// autotune results and compiled kernels (PTX): `GANCLUSTER_KERNEL_CACHE`,
/// else `gancluster/kernels` in the user's cache folder (`XDG_CACHE_HOME`,
/// else `~/.cache`), else the system's temporary folder. Without it cubecl
/// tunes every new kernel shape again in every process (28–40 s a matmul
/// shape on an H200) and keeps its results under the `target/` of
/// whatever Cargo project the process was started in.
pub fn kernel_cache(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> std::path::PathBuf {
    use std::path::PathBuf;
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("GANCLUSTER_KERNEL_CACHE").unwrap_or_else(|| {
        set("XDG_CACHE_HOME")
            .or_else(|| set("HOME").map(|home| home.join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("gancluster")
            .join("kernels")
    })
}

/// Points cubecl's autotune and compilation caches at `folder`, once per
/// process and before the first kernel. Local workers share it: cubecl
/// locks each cache file while it reads or writes, so ranks tuning at the
/// same time (each on its own GPU, which costs no more wall time than one
/// rank tuning alone) never corrupt it, and from the second run on every
/// rank finds the results of the first. A `cubecl.toml` and cubecl's
/// environment variables (`CUBECL_AUTOTUNE_LEVEL`) still apply.
#[cfg(feature = "cuda")]
fn keep_kernels(folder: &std::path::Path) {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.autotune.cache = CacheConfig::File(folder.join("autotune"));
        config.compilation.cache = Some(CacheConfig::File(folder.join("ptx")));
        CubeClRuntimeConfig::set(config);
        tracing::info!(folder = %folder.display(), "kernel cache (GANCLUSTER_KERNEL_CACHE)");
    });
}

#[cfg(feature = "cuda")]
fn cuda_driver_present() -> anyhow::Result<()> {
    const NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
    for name in NAMES {
        // SAFETY: loading the NVIDIA driver library runs only its own
        // initialisers; the handle is dropped right away.
        if unsafe { libloading::Library::new(name) }.is_ok() {
            return Ok(());
        }
    }
    anyhow::bail!(
        "this worker was built with the `cuda` feature but the NVIDIA driver library \
         (libcuda.so.1) cannot be loaded: run it on a machine with an NVIDIA GPU and driver, \
         or use a CPU build (without `--features cuda`)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::path::PathBuf;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_kernel_cache_is_where_it_is_set_else_in_the_user_s_cache_folder() {
        let set = env(&[
            ("GANCLUSTER_KERNEL_CACHE", "/vol/kernels"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(kernel_cache(set), PathBuf::from("/vol/kernels"));
        let xdg = env(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]);
        assert_eq!(kernel_cache(xdg), PathBuf::from("/xdg/gancluster/kernels"));
        let home = env(&[("GANCLUSTER_KERNEL_CACHE", ""), ("HOME", "/home/u")]);
        assert_eq!(
            kernel_cache(home),
            PathBuf::from("/home/u/.cache/gancluster/kernels")
        );
        assert_eq!(
            kernel_cache(env(&[])),
            std::env::temp_dir().join("gancluster/kernels")
        );
    }
}
