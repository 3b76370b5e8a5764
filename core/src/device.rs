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
            .map(|a| (a.get_info(), a.features().contains(wgpu::Features::SHADER_F16)))
            .collect::<Vec<_>>()
    });
    let Ok(listed) = listed else { return vec![] };
    let mut counts = [0usize; 4];
    let mut adapters: Vec<Adapter> = listed
        .into_iter()
        .filter_map(|(info, f16)| {
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
            }
        }
        DeviceChoice::Auto => match gpu(false) {
            Some((a, device)) => SelectedDevice {
                device,
                description: format!("gpu: {} ({}), chosen by --device auto", a.name, a.backend),
                is_gpu: true,
                precision,
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
