//! `--plot DIR`: an SVG latency histogram and an SVG throughput-over-time chart per scenario.

use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::stats::Figures;

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Writes `<scenario>-latency.svg` and `<scenario>-throughput.svg`; returns their paths.
pub fn write(dir: &Path, scenario: &str, title: &str, f: &Figures) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    if !f.latency.is_empty() {
        let path = dir.join(format!("{scenario}-latency.svg"));
        latency(&path, title, &f.latency).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    if f.timeline.1.iter().any(|&n| n > 0) {
        let path = dir.join(format!("{scenario}-throughput.svg"));
        throughput(&path, title, f.timeline.0, &f.timeline.1)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Event counts in log-spaced latency buckets (10 per decade), drawn as bars on a log axis,
/// with p50, p99 and p99.9 marked.
fn latency(path: &Path, title: &str, h: &Histogram<u64>) -> DrawResult {
    const PER_DECADE: f64 = 10.0;
    let max = h.max().max(2) as f64;
    let nb = (max.log10() * PER_DECADE).ceil() as usize + 1;
    let mut buckets = vec![0u64; nb];
    for v in h.iter_recorded() {
        let x = v.value_iterated_to().max(1) as f64;
        let i = ((x.log10() * PER_DECADE).floor() as usize).min(nb - 1);
        buckets[i] += v.count_at_value();
    }
    let top = buckets.iter().copied().max().unwrap_or(1).max(1);
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_hi = 10f64.powf(nb as f64 / PER_DECADE);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("ts-to-receipt latency: {title}"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((1f64..x_hi).log_scale(), 0u64..top + top / 10)?;
    chart
        .configure_mesh()
        .x_desc("latency (microseconds, log scale)")
        .y_desc("events")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    chart.draw_series(
        buckets
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                let lo = 10f64.powf(i as f64 / PER_DECADE);
                let hi = 10f64.powf((i + 1) as f64 / PER_DECADE);
                Rectangle::new([(lo, 0), (hi, c)], BLUE.mix(0.6).filled())
            }),
    )?;
    for (q, name, color) in [
        (0.5, "p50", GREEN),
        (0.99, "p99", RED),
        (0.999, "p99.9", MAGENTA),
    ] {
        let v = h.value_at_quantile(q).max(1) as f64;
        chart
            .draw_series(LineSeries::new(
                vec![(v, 0), (v, top)],
                color.stroke_width(2),
            ))?
            .label(format!("{name} = {} us", v as u64))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Delivered events per second in each bin since the run started.
fn throughput(path: &Path, title: &str, width_us: u64, bins: &[u64]) -> DrawResult {
    let per_sec: Vec<(f64, f64)> = bins
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (
                i as f64 * width_us as f64 / 1e6,
                n as f64 * 1e6 / width_us as f64,
            )
        })
        .collect();
    let x_hi = bins.len() as f64 * width_us as f64 / 1e6;
    let y_hi = per_sec.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("delivered events per second: {title}"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..x_hi, 0f64..y_hi)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "seconds since the runs started ({} ms bins)",
            width_us / 1000
        ))
        .y_desc("events / s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    chart.draw_series(LineSeries::new(per_sec, BLUE.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
