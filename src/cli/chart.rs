//! PNG charts: drawn with plotters into memory, then encoded and written here, so a write
//! that fails (a full disk) is reported instead of being lost in a buffered writer's drop.

use std::path::Path;

use anyhow::{Context, Result};
use image::ImageEncoder;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws a `width` × `height` chart with `draw` (text in the embedded DejaVu Sans, as
/// "sans-serif") and writes it to `path` as a PNG.
pub fn save_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&Area) -> Result<()>,
) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("cannot load the embedded DejaVu font"))?;
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        &rgb,
        width,
        height,
        image::ColorType::Rgb8,
    )?;
    std::fs::write(path, png).with_context(|| format!("{}", path.display()))
}
