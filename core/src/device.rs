//! Device selection: burn's `flex` backend on the CPU, wgpu (Vulkan/Metal/…) on the GPU.
//!
//! Adapters are listed with wgpu itself before burn touches them, so asking for a GPU that is not there is a
//! clear error instead of a panic inside the backend.

use burn::tensor::{Device, DeviceKind, DType};

use crate::error::{Error, Result};
use crate::weights::Precision;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A hardware GPU when one exists, else the CPU.
    Auto,
    Cpu,
    /// Any wgpu adapter, hardware first; a software one (lavapipe, SwiftShader) only when nothing else exists.
    Gpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "gpu" | "wgpu" => Ok(Self::Gpu),
            _ => Err(format!("unknown device {s:?} (auto, cpu or gpu)")),
        }
    }
}

/// A wgpu adapter as the system reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Adapter {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub shader_f16: bool,
    /// The largest storage buffer a shader can bind (`max_storage_buffer_binding_size`): 128 MiB on lavapipe and
    /// many phones' Vulkan drivers. burn's wgpu runtime asks for the adapter's own limits.
    pub max_storage_binding_bytes: u64,
    #[serde(skip)]
    kind: DeviceKind,
}

impl Adapter {
    pub fn is_software(&self) -> bool {
        self.device_type == "Cpu"
    }
}

/// Lists wgpu adapters of the primary APIs (Vulkan, Metal, DX12), hardware first. Never panics.
pub fn list_adapters() -> Vec<Adapter> {
    let listed = std::panic::catch_unwind(|| {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if std::env::var_os("WGPU_BACKEND").is_none() {
            // GL adapters are not used by burn's wgpu runtime; probing them only prints EGL noise.
            desc.backends = wgpu::Backends::PRIMARY;
        }
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        pollster::block_on(instance.enumerate_adapters(backends))
            .into_iter()
            .map(|a| (a.get_info(), a.features().contains(wgpu::Features::SHADER_F16),
                      a.limits().max_storage_buffer_binding_size as u64))
            .collect::<Vec<_>>()
    });
    let Ok(listed) = listed else { return vec![] };
    let mut counts = [0usize; 4];
    let mut adapters: Vec<Adapter> = listed
        .into_iter()
        .filter_map(|(info, f16, max_binding)| {
            let (slot, kind): (usize, fn(usize) -> DeviceKind) = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => (0, DeviceKind::DiscreteGpu),
                wgpu::DeviceType::IntegratedGpu => (1, DeviceKind::IntegratedGpu),
                wgpu::DeviceType::VirtualGpu => (2, DeviceKind::VirtualGpu),
                wgpu::DeviceType::Cpu => (3, |_| DeviceKind::Cpu),
                wgpu::DeviceType::Other => return None,
            };
            let index = counts[slot];
            counts[slot] += 1;
            Some(Adapter {
                name: info.name,
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                shader_f16: f16,
                max_storage_binding_bytes: max_binding,
                kind: kind(index),
            })
        })
        .collect();
    adapters.sort_by_key(|a| match a.device_type.as_str() {
        "DiscreteGpu" => 0,
        "IntegratedGpu" => 1,
        "VirtualGpu" => 2,
        _ => 3,
    });
    adapters
}

/// The device the runtime will use, described for logs and `--json`.
#[derive(Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub description: String,
    pub is_gpu: bool,
    pub precision: Precision,
    /// The largest tensor one shader can bind on this device (`None`: no limit, the CPU).
    pub max_binding_bytes: Option<u64>,
}

impl SelectedDevice {
    /// Where a parameter of `bytes` bytes that is only ever read a few rows at a time (the token-embedding table)
    /// lives: on the device when it fits one binding, else on the CPU, which looks the rows up and hands them over.
    pub fn lookup_table_device(&self, bytes: u64) -> Device {
        match self.max_binding_bytes {
            Some(limit) if bytes > limit => Device::flex(),
            _ => self.device.clone(),
        }
    }

    /// Refuses a model whose parameter `name` (`bytes`) is larger than one binding of this device, with the limit
    /// named, before any weight is read.
    pub fn check_fits(&self, component: &str, name: &str, bytes: u64) -> Result<()> {
        match self.max_binding_bytes {
            Some(limit) if bytes > limit => Err(Error::DeviceUnavailable(format!(
                "{}: {component}.{name} needs {:.1} MiB in one buffer, but this device binds at most {:.1} MiB per \
                 buffer (max_storage_buffer_binding_size); use --device cpu", self.description,
                bytes as f64 / 1048576.0, limit as f64 / 1048576.0))),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for SelectedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.description, self.precision)
    }
}

fn cpu(precision: Precision) -> SelectedDevice {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    SelectedDevice {
        device: Device::flex(),
        description: format!("cpu (burn flex, {threads} threads)"),
        is_gpu: false,
        precision,
        max_binding_bytes: None,
    }
}

/// Picks the device for `choice` and checks that it can compute in `precision`.
pub fn select(choice: DeviceChoice, precision: Precision) -> Result<SelectedDevice> {
    let gpu = |allow_software: bool| -> Option<(Adapter, Device)> {
        let adapters = list_adapters();
        let a = adapters.into_iter().find(|a| allow_software || !a.is_software())?;
        let device = Device::wgpu(a.kind.clone());
        Some((a, device))
    };
    let selected = match choice {
        DeviceChoice::Cpu => cpu(precision),
        DeviceChoice::Gpu => {
            let (a, device) = gpu(true).ok_or_else(|| {
                Error::DeviceUnavailable(
                    "--device gpu: no wgpu adapter found (no Vulkan/Metal/DX12 driver; on Linux install a Vulkan \
                     driver, e.g. mesa-vulkan-drivers)".into(),
                )
            })?;
            let software = if a.is_software() { ", software rasteriser" } else { "" };
            SelectedDevice {
                device,
                description: format!("gpu: {} ({}{software})", a.name, a.backend),
                is_gpu: true,
                precision,
                max_binding_bytes: Some(a.max_storage_binding_bytes),
            }
        }
        DeviceChoice::Auto => match gpu(false) {
            Some((a, device)) => SelectedDevice {
                device,
                description: format!("gpu: {} ({}), chosen by --device auto", a.name, a.backend),
                is_gpu: true,
                precision,
                max_binding_bytes: Some(a.max_storage_binding_bytes),
            },
            None => {
                let mut s = cpu(precision);
                s.description.push_str(", chosen by --device auto: no hardware GPU adapter");
                s
            }
        },
    };
    if precision == Precision::F16 && !selected.device.supports_dtype(DType::F16) {
        return Err(Error::DeviceUnavailable(format!(
            "{} cannot compute in f16 (no shader-f16 support); use --precision f32",
            selected.description
        )));
    }
    Ok(selected)
}
