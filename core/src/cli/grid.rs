//! `unsee grid`: a grid of images, one row per model (as loaded; after erasing the spec's concepts), one column per
//! prompt × seed.

use std::path::PathBuf;

use image::RgbaImage;

use super::{ModelArgs, rgba_image, save_png};
use unsee::erase::spec::Spec;
use unsee::error::{Error, Result};
use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Images per prompt (seeds 0..N).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// An edit spec (TOML): adds the row "after erasure".
    #[arg(long)]
    spec: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Nearest-neighbour upscaling of each image (small models draw small pictures).
    #[arg(long, default_value_t = 1)]
    scale: u32,
    /// Wrap each model's images into rows of this many (default: one row per model).
    #[arg(long)]
    columns: Option<usize>,
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
}

/// Gap between images, and the extra gap between models' blocks of rows, in pixels.
const GAP: u32 = 2;
const MODEL_GAP: u32 = 6;

/// Tiles equally sized images on white: each model's images (one entry of `models`) wrap into rows of `columns`,
/// and models are separated by a wider gap than images.
pub fn tile(models: &[Vec<RgbaImage>], columns: usize) -> Result<RgbaImage> {
    let first = models.first().and_then(|m| m.first()).ok_or_else(|| Error::Internal("an empty grid".into()))?;
    let (w, h) = first.dimensions();
    let cells = models.iter().map(Vec::len).max().unwrap_or(0);
    let cols = columns.clamp(1, cells.max(1));
    let rows_per_model = cells.div_ceil(cols);
    let n_rows = (models.len() * rows_per_model) as u32;
    let mut grid = RgbaImage::from_pixel(cols as u32 * (w + GAP) - GAP,
                                         n_rows * (h + GAP) - GAP + (models.len() as u32 - 1) * MODEL_GAP,
                                         image::Rgba([255, 255, 255, 255]));
    for (r, images) in models.iter().enumerate() {
        for (c, img) in images.iter().enumerate() {
            if img.dimensions() != (w, h) {
                return Err(Error::Internal("grid images differ in size".into()));
            }
            let row = (r * rows_per_model + c / cols) as i64;
            image::imageops::replace(&mut grid, img, (c % cols) as i64 * (w + GAP) as i64,
                                     row * (h + GAP) as i64 + r as i64 * MODEL_GAP as i64);
        }
    }
    Ok(grid)
}

pub fn run(a: Args) -> Result<()> {
    if a.steps == 0 || a.seeds == 0 || !(1..=64).contains(&a.scale) || a.columns == Some(0) {
        return Err(Error::InvalidRequest("--steps, --seeds and --columns must be at least 1, --scale 1..=64".into()));
    }
    let images = (a.prompts.len() as u64).checked_mul(a.seeds).filter(|&n| n <= unsee::limits::MAX_GRID_IMAGES);
    if images.is_none() {
        return Err(Error::InvalidRequest(format!(
            "{} prompts × {} seeds is more than {} images per model", a.prompts.len(), a.seeds,
            unsee::limits::MAX_GRID_IMAGES
        )));
    }
    let spec = a.spec.as_deref().map(Spec::from_file).transpose()?;
    let mut engine = a.model.open()?;
    if spec.is_some() {
        // Refused before the first row is drawn, not after it.
        engine.check_can_erase()?;
    }
    let cells: Vec<(&String, u64)> = a.prompts.iter().flat_map(|p| (0..a.seeds).map(move |s| (p, s))).collect();
    let mut models = vec![];
    for r in 0..1 + usize::from(spec.is_some()) {
        if r == 1
            && let Some(spec) = &spec
        {
            engine.erase(spec, None)?;
        }
        let mut images = vec![];
        for (prompt, seed) in &cells {
            let req = GenerateRequest { prompt: prompt.to_string(), steps: a.steps, guidance: a.guidance, seed: *seed,
                                        ..Default::default() };
            let g = engine.generate(&req, Inputs::default(), &mut |_| Control::Continue, Target::Rgba)?;
            let img = rgba_image(g.width, g.height, g.rgba)?;
            images.push(image::imageops::resize(&img, img.width() * a.scale, img.height() * a.scale,
                                                image::imageops::FilterType::Nearest));
            eprintln!("row {} ({}), {prompt:?} seed {seed}", r + 1, if r == 0 { "model" } else { "erased" });
        }
        models.push(images);
    }
    let grid = tile(&models, a.columns.unwrap_or(cells.len()))?;
    save_png(&grid, &a.out)?;
    eprintln!("wrote {} ({} × {} images)", a.out.display(), models.len(), cells.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(v: u8) -> RgbaImage {
        RgbaImage::from_pixel(4, 3, image::Rgba([v, v, v, 255]))
    }

    #[test]
    fn tile_places_models_and_wraps_rows() {
        // Two models × three images, wrapped into rows of two: 2 rows per model.
        let models = vec![vec![solid(10), solid(20), solid(30)], vec![solid(40), solid(50), solid(60)]];
        let g = tile(&models, 2).unwrap();
        assert_eq!(g.dimensions(), (2 * (4 + GAP) - GAP, 4 * (3 + GAP) - GAP + MODEL_GAP));
        assert_eq!(g.get_pixel(0, 0)[0], 10);
        assert_eq!(g.get_pixel(4 + GAP, 0)[0], 20);
        assert_eq!(g.get_pixel(0, 3 + GAP)[0], 30);
        assert_eq!(g.get_pixel(4 + GAP, 3 + GAP)[0], 255, "the empty cell stays white");
        assert_eq!(g.get_pixel(0, 2 * (3 + GAP) + MODEL_GAP)[0], 40);
        assert_eq!(g.get_pixel(4, 0)[0], 255, "the gap is white");
        // One row per model when columns ≥ images.
        assert_eq!(tile(&models, 9).unwrap().dimensions(), (3 * (4 + GAP) - GAP, 2 * (3 + GAP) - GAP + MODEL_GAP));
        assert!(tile(&[], 1).is_err());
    }
}
