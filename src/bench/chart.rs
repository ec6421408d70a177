//! The SVG chart of a run, drawn with `plotters`: time to first answer per workload,
//! cold vs each restore mode (log scale), and time to first answer vs memory size for
//! the `c/mem.c` series.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::Report;
use super::stats::Summary;
use super::{Start, WorkloadResult};

const COLD: RGBColor = RGBColor(200, 80, 60);
const EAGER: RGBColor = RGBColor(70, 110, 190);
const LAZY: RGBColor = RGBColor(110, 170, 90);
const LAZY_WS: RGBColor = RGBColor(235, 165, 40);
const SERVED: RGBColor = RGBColor(190, 60, 150);

fn series() -> [(&'static str, RGBColor, Option<Start>); 5] {
    [
        ("cold start", COLD, None),
        ("restore, eager", EAGER, Some(Start::Eager)),
        ("restore, lazy", LAZY, Some(Start::Lazy)),
        ("restore, lazy + working set", LAZY_WS, Some(Start::LazyWs)),
        ("served from a parked pool", SERVED, Some(Start::Served)),
    ]
}

fn summary_of(r: &WorkloadResult, which: Option<Start>) -> Option<&Summary> {
    match which {
        None => r.cold_ms.as_ref(),
        Some(m) => r.mode(m).and_then(|x| x.first_answer_ms.as_ref()),
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

/// Writes the chart to `path`.
pub fn draw(rep: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &format!(
                "warmstart: time to first answer, cold vs restored ({})",
                rep.machine.date
            ),
            ("sans-serif", 18),
        )
        .map_err(err)?;
    let (left, right) = root.split_horizontally(760);
    per_workload(&left, &rep.workloads)?;
    by_size(&right, &rep.workloads)?;
    root.present().map_err(err)?;
    Ok(())
}

fn bounds<'a>(values: impl Iterator<Item = &'a Summary>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for s in values {
        lo = lo.min(s.min);
        hi = hi.max(s.max);
    }
    if hi <= 0.0 {
        return (1.0, 1000.0);
    }
    let lo = 10f64.powf(lo.max(0.01).log10().floor());
    // One more decade on top: room for the legend.
    let hi = 10f64.powf(hi.log10().ceil() + 1.0);
    (lo, hi.max(lo * 100.0))
}

fn per_workload<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    all: &[WorkloadResult],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let rows: Vec<&WorkloadResult> = all.iter().filter(|r| r.cold_ms.is_some()).collect();
    let (lo, hi) = bounds(
        rows.iter()
            .flat_map(|r| series().map(|(_, _, m)| summary_of(r, m)))
            .flatten(),
    );
    let n = rows.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption("per workload (median, bar = range)", ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ms to first answer (log)")
        .y_label_formatter(&|v| format!("{v}"))
        .draw()
        .map_err(err)?;
    let width = 0.8 / 4.0;
    for (k, (label, color, mode)) in series().into_iter().enumerate() {
        let bars: Vec<(f64, &Summary)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                summary_of(r, mode).map(|s| (i as f64 + 0.1 + k as f64 * width, s))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|(x, s)| {
                Rectangle::new([(*x, lo), (*x + width * 0.9, s.median)], color.filled())
            }))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart
            .draw_series(bars.iter().map(|(x, s)| {
                let c = *x + width * 0.45;
                PathElement::new(vec![(c, s.min), (c, s.max)], BLACK.stroke_width(1))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    // Workload names under their group (the x axis has no numeric meaning).
    for (i, r) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, lo));
        let failed = r.modes.iter().all(|m| m.first_answer_ms.is_none());
        let style = TextStyle::from(("sans-serif", 12).into_font()).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ),
        );
        area.draw(&Text::new(
            r.name.clone(),
            (px - area_x(area), py + 8),
            style.clone(),
        ))
        .map_err(err)?;
        if failed {
            area.draw(&Text::new(
                "restore failed",
                (px - area_x(area), py + 24),
                style.color(&COLD),
            ))
            .map_err(err)?;
        }
    }
    Ok(())
}

/// The area's left edge in backend pixels (`backend_coord` is absolute).
fn area_x<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>) -> i32 {
    area.get_base_pixel().0
}

fn by_size<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    all: &[WorkloadResult],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut rows: Vec<&WorkloadResult> = all.iter().filter(|r| r.memory_mib.is_some()).collect();
    rows.sort_by_key(|r| r.memory_mib);
    let (lo, hi) = bounds(
        rows.iter()
            .flat_map(|r| series().map(|(_, _, m)| summary_of(r, m)))
            .flatten(),
    );
    let max_mib = rows
        .iter()
        .filter_map(|r| r.memory_mib)
        .max()
        .unwrap_or(2048) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption("c/mem.c: time vs memory size", ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_mib * 1.05, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("MiB filled with random data (plus as many zero MiB)")
        .y_desc("ms to first answer (log)")
        .y_label_formatter(&|v| format!("{v}"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (label, color, mode) in series() {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r.memory_mib? as f64, summary_of(r, mode)?.median)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}
