//! Limits on the counts and sizes that files and requests contain, checked before anything is allocated: a
//! hostile `config.json` or request gets a clear error, never an allocation abort (which no `catch_unwind` can
//! catch). Every limit is far above what any SD-1.x/2.x model or phone-sized request needs.

/// Channels of any layer, hidden and intermediate sizes.
pub const MAX_WIDTH: usize = 65_536;
/// Blocks of a UNet/VAE (SD: 4).
pub const MAX_BLOCKS: usize = 8;
/// Layers per block, transformer layers per block, text-encoder layers (SD: 2, 1, 12; SDXL's text encoder: 32).
pub const MAX_LAYERS: usize = 64;
/// Attention heads (SD-2: 64 head dims × 20 heads).
pub const MAX_HEADS: usize = 1024;
/// Input/output/latent channels of the UNet and VAE (SD: 4 and 3).
pub const MAX_IO_CHANNELS: usize = 64;
/// Text-encoder vocabulary (CLIP: 49,408).
pub const MAX_VOCAB: usize = 1_000_000;
/// Text-encoder positions (CLIP: 77).
pub const MAX_POSITIONS: usize = 4096;
/// Images one `grid` call draws.
pub const MAX_GRID_IMAGES: u64 = 1024;
/// Work budget of one generation: latent pixels × UNet steps (a 1024² image at 50 steps is 16,384 × 50 ≈ 0.8 M;
/// 4096² at 1,000 steps would be 262 M). Requests above it are refused before any work is done.
pub const MAX_LATENT_PIXEL_STEPS: usize = 4_194_304;

/// `v` within `lo..=hi`, or an error naming `name`.
pub fn count(name: &str, v: usize, lo: usize, hi: usize) -> Result<(), String> {
    if (lo..=hi).contains(&v) { Ok(()) } else { Err(format!("{name} = {v} is outside {lo}..={hi}")) }
}

/// `x` finite and > 0, or an error naming `name`.
pub fn positive(name: &str, x: f64) -> Result<(), String> {
    if x.is_finite() && x > 0.0 { Ok(()) } else { Err(format!("{name} = {x} must be a finite number > 0")) }
}
