//! `ringkv bench --plot FILE.svg`: latency CDFs (one curve per setting and
//! operation) and the staleness curve (share of fresh reads against the
//! wait after a write, each share with its 95% interval as an error bar),
//! side by side in one SVG.

use plotters::prelude::*;

use crate::ycsb::SettingReport;

/// Why the plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the plot: {reason}")]
pub struct PlotError {
    pub reason: String,
}

/// Points of a latency CDF: (latency ms, cumulative share), from the
/// histogram's recorded values.
fn cdf(report: &crate::ycsb::OpReport) -> Vec<(f64, f64)> {
    let h = &report.latency_us;
    if h.is_empty() {
        return Vec::new();
    }
    let total = h.len() as f64;
    let mut seen = 0u64;
    let mut points = Vec::new();
    for v in h.iter_recorded() {
        seen += v.count_at_value();
        points.push((v.value_iterated_to() as f64 / 1000.0, seen as f64 / total));
    }
    points
}

/// The series legend, boxed in the lower right, as both charts draw it.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
}

/// Draws `reports` as an SVG document (the caller writes it out whole).
pub fn render_svg(reports: &[SettingReport]) -> Result<String, PlotError> {
    let mut svg = String::new();
    draw(&mut svg, reports)?;
    Ok(svg)
}

fn draw(svg: &mut String, reports: &[SettingReport]) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        reason: e.to_string(),
    };
    let root = SVGBackend::with_string(svg, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (left, right) = root.split_horizontally(720);

    let curves: Vec<(String, Vec<(f64, f64)>)> = reports
        .iter()
        .flat_map(|r| {
            r.ops
                .iter()
                .map(move |(op, o)| (format!("{} {}", r.setting, op.as_str()), cdf(o)))
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let max_ms = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(ms, _)| *ms))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&left)
        .caption("latency CDF", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((0.01f64..max_ms * 1.1).log_scale(), 0f64..1f64)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log)")
        .y_desc("share of requests")
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, (label, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(x, y)| (x.max(0.01), *y)),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    draw_legend(&mut chart).map_err(|e| fail(&e))?;

    let max_t = reports
        .iter()
        .flat_map(|r| r.staleness.iter().map(|v| v.t_ms))
        .max()
        .unwrap_or(100)
        .max(1) as f64;
    let mut stale = ChartBuilder::on(&right)
        .caption("staleness (PBS t-visibility)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..max_t, 0f64..1.05f64)
        .map_err(|e| fail(&e))?;
    stale
        .configure_mesh()
        .x_desc("ms after the write's acknowledgement")
        .y_desc("share of reads that see it")
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, r) in reports.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = r
            .staleness
            .iter()
            .filter(|v| v.probes > 0)
            .map(|v| (v.t_ms as f64, v.fresh_share()))
            .collect();
        stale
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(r.setting.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        // Each share's 95% interval: a short run makes few probes per t.
        stale
            .draw_series(r.staleness.iter().filter_map(|v| {
                let (low, high) = v.fresh_interval95()?;
                Some(ErrorBar::new_vertical(
                    v.t_ms as f64,
                    low,
                    v.fresh_share(),
                    high,
                    color.stroke_width(1),
                    6,
                ))
            }))
            .map_err(|e| fail(&e))?;
    }
    draw_legend(&mut stale).map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Op;
    use crate::ycsb::{OpReport, Visibility};

    fn report(staleness: Vec<Visibility>) -> SettingReport {
        let mut read = OpReport::new();
        read.ops = 3;
        for us in [100, 200, 300] {
            read.latency_us.record(us).unwrap();
        }
        let mut report = SettingReport::for_tests(vec![(Op::Read, read)]);
        (report.reads, report.values_read, report.records_after) = (3, 3, 3);
        (report.staleness, report.probers) = (staleness, 1);
        report
    }

    /// Each probed share is drawn with its interval: a vertical bar and
    /// its two caps, three lines more per share than the same plot with
    /// nothing probed.
    #[test]
    fn each_probed_share_gets_an_error_bar() {
        let at = |t_ms, probes, fresh| Visibility {
            t_ms,
            probes,
            fresh,
            ..Visibility::default()
        };
        let lines = |staleness| {
            render_svg(&[report(staleness)])
                .unwrap()
                .matches("<line")
                .count()
        };
        let unprobed = lines(vec![at(0, 0, 0), at(10, 0, 0), at(100, 0, 0)]);
        let probed = lines(vec![at(0, 30, 8), at(10, 30, 20), at(100, 0, 0)]);
        assert_eq!(probed, unprobed + 2 * 3);
    }
}
