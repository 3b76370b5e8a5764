//! Host ↔ device conversions used across the runtime, each written once: reading a tensor back as f32 and
//! turning token ids into an input tensor. (Tensor ↔ f64 matrix conversions for the erasure engine build on
//! these in [`crate::erase::linalg`].)

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::error::{Error, Result};

/// Reads `t` back to the host as f32 values, row-major (whatever dtype it is stored in on the device).
pub fn to_f32_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    let t = if matches!(t.dtype(), DType::QFloat(_)) { crate::kernels::dequantize_any(t)? } else { t };
    t.cast(DType::F32).into_data().try_to_vec::<f32>()
        .map_err(|e| Error::Internal(format!("reading a tensor back as f32: {e:?}")))
}

/// Whether `t` holds quantized values ([`crate::quant`]).
pub fn is_quantized<const D: usize>(t: &Tensor<D>) -> bool {
    matches!(t.dtype(), DType::QFloat(_))
}

/// Token ids as the text encoder's input, `[1, len]`.
pub fn token_ids(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::<1, Int>::from_data(TensorData::new(v, [ids.len()]), device).reshape([1, ids.len()])
}
