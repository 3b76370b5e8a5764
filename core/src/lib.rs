//! unsee: Stable Diffusion 1.x on burn (CPU via `flex`, GPU via wgpu), with module and field names equal to the
//! diffusers checkpoint keys, proven equal to diffusers by the tests in `core/tests/`.

pub mod clip;
pub mod bundle;
pub mod compvis;
pub mod erase;
pub mod kernels;
pub mod device;
pub mod engine;
pub mod error;
pub mod limits;
pub mod load;
pub mod lora;
pub mod model;
pub mod nn;
pub mod pickle;
pub mod pipeline;
pub mod quant;
pub mod scheduler;
#[cfg(feature = "serve")]
pub mod serve;
pub mod shapes;
pub mod tensor;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
