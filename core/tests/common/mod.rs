//! Helpers shared by the parity tests: golden tensors from `tests/fixtures/` and comparisons that say where a
//! divergence is.
#![allow(dead_code)]

pub mod checks;
pub mod http;

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    repo().join("tests").join("fixtures")
}

/// A fresh temporary folder for one test, under cargo's per-target scratch folder (`target/tmp`), named by the
/// test (not the process), so a run replaces the previous run's folder instead of leaving one more behind in the
/// system's temp folder.
pub fn tmp_dir(prefix: &str, name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("unsee-{prefix}-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

pub fn model_dir(name: &str) -> PathBuf {
    match name {
        "tiny" => repo().join("models").join("tiny-sd"),
        "small" => fixtures().join("small-sd"),
        other => panic!("unknown model {other}"),
    }
}

pub struct Golden {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>, Vec<i64>)>,
}

impl Golden {
    pub fn load(model: &str) -> Self {
        Self::load_file(&fixtures().join(model).join("golden.safetensors"))
    }

    pub fn load_file(p: &std::path::Path) -> Self {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (name, v) in st.tensors() {
            let shape = v.shape().to_vec();
            let (f, i) = match v.dtype() {
                Dtype::F32 => (v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(), vec![]),
                Dtype::I64 => (vec![], v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
                d => panic!("unexpected dtype {d:?}"),
            };
            tensors.insert(name, (shape, f, i));
        }
        Self { tensors }
    }

    pub fn f32(&self, name: &str) -> (&[usize], &[f32]) {
        let (s, f, _) = self.tensors.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing"));
        (s, f)
    }

    pub fn i64(&self, name: &str) -> &[i64] {
        &self.tensors.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing")).2
    }

    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let (s, f) = self.f32(name);
        let shape: [usize; D] = s.try_into().unwrap();
        Tensor::from_data(TensorData::new(f.to_vec(), shape), device)
    }

    pub fn ids(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        let v = self.i64(name).to_vec();
        let n = v.len();
        Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device).reshape([1, n])
    }
}

pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(burn::tensor::DType::F32).into_data().try_to_vec::<f32>().unwrap()
}

/// Max |a-b| and the flat index where it occurs.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut worst = (0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        if d > worst.0 || d.is_nan() {
            worst = (if d.is_nan() { f32::INFINITY } else { d }, i);
        }
    }
    worst
}

/// Compares a computed tensor with a golden one. `tol` is absolute, scaled by max(1, max|golden|).
/// Returns the error instead of panicking so a caller can report the first diverging stage.
pub fn compare(what: &str, got: &[f32], want: &[f32], tol: f32) -> Result<f32, String> {
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    let (err, at) = max_abs_diff(got, want);
    if err <= tol * scale {
        Ok(err)
    } else {
        Err(format!(
            "{what}: max |Δ| = {err:.3e} at flat index {at} (got {}, want {}), tolerance {:.1e} × scale {scale:.3}",
            got[at], want[at], tol
        ))
    }
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    match compare(what, got, want, tol) {
        Ok(err) => eprintln!("{what}: ok, max |Δ| = {err:.3e}"),
        Err(msg) => panic!("{msg}"),
    }
}
