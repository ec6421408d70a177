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

/// Pixels per workload row of the per-workload chart (five bars and a gap).
const ROW_PX: u32 = 76;

/// Writes the chart to `path`.
pub fn draw(rep: &Report, path: &Path) -> Result<()> {
    let rows = rep.workloads.iter().filter(|r| r.cold_ms.is_some()).count() as u32;
    // Tall enough that every workload row has room for its name and its bars.
    let height = (160 + (rows + 2) * ROW_PX).max(520);
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
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
    let (right, _) = right.split_vertically(520.min(height - 40));
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
    // One more decade on top: room for the ratio labels.
    let hi = 10f64.powf(hi.log10().ceil() + 1.0);
    (lo, hi.max(lo * 100.0))
}

/// "×130", "×7.5": how many times faster than cold a restored median is.
fn ratio_label(ratio: f64) -> String {
    if ratio >= 10.0 {
        format!("×{ratio:.0}")
    } else {
        format!("×{ratio:.1}")
    }
}

/// Horizontal bars, one row per workload (its name on the left, on a line of its own):
/// the median time of cold and of each restore mode, the range as a whisker, and on
/// each restored bar how many times faster than cold it is (median of the paired
/// cold/restored ratios).
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
    let n = rows.len() as f64;
    // Two rows of headroom at the top for the legend.
    let mut chart = ChartBuilder::on(area)
        .caption("per workload (median, whisker = range)", ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(180)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..n + 2.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("ms to first answer (log)")
        .x_label_formatter(&|v| format!("{v}"))
        .draw()
        .map_err(err)?;
    // Row i (first workload at the top) spans y in [n - i - 1, n - i).
    let kinds = series().len() as f64;
    let bar = 0.8 / kinds;
    let small = TextStyle::from(("sans-serif", 13).into_font()).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Left,
            plotters::style::text_anchor::VPos::Center,
        ),
    );
    for (k, (label, color, mode)) in series().into_iter().enumerate() {
        let bars: Vec<(f64, &Summary, Option<f64>)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let s = summary_of(r, mode)?;
                let top = n - i as f64 - 0.1 - k as f64 * bar;
                let ratio = mode
                    .and_then(|m| r.mode(m))
                    .and_then(|x| x.ratio.as_ref())
                    .map(|x| x.median);
                Some((top, s, ratio))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|(top, s, _)| {
                Rectangle::new([(lo, *top), (s.median, *top - bar * 0.85)], color.filled())
            }))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart
            .draw_series(bars.iter().map(|(top, s, _)| {
                let c = *top - bar * 0.425;
                PathElement::new(vec![(s.min, c), (s.max, c)], BLACK.stroke_width(1))
            }))
            .map_err(err)?;
        chart
            .draw_series(bars.iter().filter_map(|(top, s, ratio)| {
                let c = *top - bar * 0.425;
                ratio.map(|q| Text::new(ratio_label(q), (s.max * 1.12, c), small.clone()))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    // Workload names left of their row, right-aligned, one per row.
    let name_style = TextStyle::from(("sans-serif", 15).into_font()).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Right,
            plotters::style::text_anchor::VPos::Center,
        ),
    );
    let base = area.get_base_pixel();
    for (i, r) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(lo, n - i as f64 - 0.5));
        let failed = r.modes.iter().all(|m| m.first_answer_ms.is_none());
        let at = (px - base.0 - 8, py - base.1);
        area.draw(&Text::new(r.name.clone(), at, name_style.clone()))
            .map_err(err)?;
        if failed {
            area.draw(&Text::new(
                "restore failed",
                (at.0, at.1 + 14),
                name_style.color(&COLD),
            ))
            .map_err(err)?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Report {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bench.json");
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    }

    /// (x, y, text) of every `<text>` element of an SVG plotters wrote.
    fn texts(svg: &str) -> Vec<(f64, f64, String)> {
        let num = |tag: &str, attr: &str| -> f64 {
            let k = format!(" {attr}=\"");
            let i = tag.find(&k).map(|i| i + k.len()).unwrap_or(0);
            tag[i..]
                .split('"')
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(f64::NAN)
        };
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let (tag, rest) = t.split_once('>')?;
                let body = rest.split("</text>").next()?;
                Some((num(tag, "x"), num(tag, "y"), body.trim().to_owned()))
            })
            .collect()
    }

    #[test]
    fn every_workload_name_is_on_a_line_of_its_own_and_restored_bars_say_how_much_faster() {
        let rep = recorded();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bench.svg");
        draw(&rep, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        let t = texts(&svg);
        let rows: Vec<&WorkloadResult> = rep
            .workloads
            .iter()
            .filter(|r| r.cold_ms.is_some())
            .collect();
        let mut ys = Vec::new();
        for r in &rows {
            let name = r.name.replace('&', "&amp;").replace('<', "&lt;");
            let hit = t
                .iter()
                .find(|(_, _, s)| *s == name)
                .unwrap_or_else(|| panic!("no label {name:?} in the chart"));
            ys.push(hit.1);
        }
        ys.sort_by(f64::total_cmp);
        for w in ys.windows(2) {
            assert!(
                w[1] - w[0] >= 14.0,
                "workload names closer than a line: {ys:?}"
            );
        }
        let ratios = t.iter().filter(|(_, _, s)| s.starts_with('×')).count();
        let restored: usize = rows
            .iter()
            .map(|r| r.modes.iter().filter(|m| m.ratio.is_some()).count())
            .sum();
        assert!(restored > 0);
        assert_eq!(ratios, restored, "one ×ratio per restored bar");
    }

    /// Redraws docs/bench.svg from docs/bench.json (after a change to the chart):
    /// `cargo test --lib redraw_docs_chart -- --ignored`.
    #[test]
    #[ignore]
    fn redraw_docs_chart() {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bench.svg");
        draw(&recorded(), &out).unwrap();
    }
}
