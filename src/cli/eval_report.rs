//! `medphi eval-report`: a table and a grouped bar chart (PNG) comparing eval runs with
//! published figures.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use medphi::eval::report::{markdown, published_rows, run_row, Row};
use plotters::prelude::*;

#[derive(Args)]
pub struct EvalReportArgs {
    /// Output folders of `medphi eval` (or lm-eval), each holding a results.json.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// CSV of published scores (model,size,pubmedqa,medqa,medmcqa,mmlu_medical,…), e.g.
    /// ../shared/data/published/zero_shot_medical_qa.csv.
    #[arg(long)]
    published: Option<PathBuf>,
    /// Where to write the bar chart.
    #[arg(long, default_value = "eval-report.png")]
    png: PathBuf,
}

pub fn eval_report(args: EvalReportArgs) -> Result<()> {
    let mut rows = Vec::new();
    for dir in &args.runs {
        let path = dir.join("results.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let label = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        rows.push(run_row(&label, &text, &path.display().to_string())?);
    }
    if let Some(p) = &args.published {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        rows.extend(published_rows(&text, &p.display().to_string())?);
    }
    if rows.iter().all(|r| r.average().is_none()) {
        bail!("no run has any of the tasks pubmedqa, medqa_4options, medmcqa or mmlu_*");
    }
    super::print_line(markdown(&rows))?;
    draw(&rows, &args.png)?;
    eprintln!("chart written to {}", args.png.display());
    Ok(())
}

fn draw(rows: &[Row], path: &std::path::Path) -> Result<()> {
    // The report's columns, then the average.
    let groups = ["PubMedQA", "MedQA", "MedMCQA", "MMLU-medical", "average"];
    let slot = rows.len() + 1;
    super::chart::save_png(path, (1280, 660), |root| {
        // Bars on the left, the legend in its own column so it never hides a bar.
        let (plot, legend) = root.split_horizontally(940);
        let mut chart = ChartBuilder::on(&plot)
            .caption("Zero-shot accuracy (%)", ("sans-serif", 28))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..(groups.len() * slot) as f64, 0f64..100f64)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("accuracy %")
            .label_style(("sans-serif", 16))
            .draw()?;
        for (g, name) in groups.iter().enumerate() {
            chart.draw_series(std::iter::once(Text::new(
                name.to_string(),
                ((g * slot) as f64 + slot as f64 / 2.0 - 1.0, 97.0),
                ("sans-serif", 18),
            )))?;
        }
        for (i, row) in rows.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = if row.published {
                color.mix(0.45).filled()
            } else {
                color.filled()
            };
            let values: Vec<Option<f64>> =
                row.scores.iter().copied().chain([row.average()]).collect();
            chart.draw_series(values.iter().enumerate().filter_map(|(g, v)| {
                v.map(|v| {
                    let x = (g * slot + i) as f64 + 0.5;
                    Rectangle::new([(x, 0.0), (x + 0.9, v)], style)
                })
            }))?;
            let y = 40 + 24 * i as i32;
            legend.draw(&Rectangle::new([(8, y), (24, y + 14)], style))?;
            legend.draw(&Text::new(row.label.clone(), (32, y), ("sans-serif", 15)))?;
        }
        Ok(())
    })
}
