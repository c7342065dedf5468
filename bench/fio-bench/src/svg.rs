//! The chart: IOPS of every cell on a log scale, one group of bars per job,
//! one bar per row, each bar but runC's labelled with its ratio to runC.
//! plotters' SVG backend only: no fonts or system libraries are needed (SVG
//! text is laid out by the viewer).

use plotters::prelude::*;
use plotters::style::FontTransform;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{Report, RowKind, fmt_ratio};

/// Chart size in pixels.
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 620;

fn color(kind: RowKind) -> RGBColor {
    match kind {
        RowKind::Runc => RGBColor(120, 120, 120),
        RowKind::NineP => RGBColor(230, 140, 30),
        RowKind::VirtioFs => RGBColor(150, 90, 190),
        RowKind::ThinboxRootfs => RGBColor(40, 100, 200),
        RowKind::ThinboxEmptyDir => RGBColor(40, 160, 90),
    }
}

/// Errors drawing the chart.
#[derive(Debug, thiserror::Error)]
#[error("drawing the chart: {0}")]
pub struct ChartError(String);

fn err<E: std::fmt::Debug>(e: E) -> ChartError {
    ChartError(format!("{e:?}"))
}

/// The chart as an SVG document.
pub fn render(report: &Report) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let values: Vec<f64> = report.cells.iter().filter_map(|c| c.result.map(|m| m.iops)).filter(|v| *v > 0.0).collect();
        let top = values.iter().copied().fold(1.0f64, f64::max);
        let bottom = values.iter().copied().fold(top, f64::min);
        // Whole decades around the data, so the log axis has round ticks.
        let (lo, hi) = (10f64.powf(bottom.log10().floor()).min(top / 10.0), 10f64.powf(top.log10().ceil() + 0.3));
        let guests: Vec<String> = report
            .rows
            .iter()
            .filter_map(|r| r.guest.as_ref())
            .map(|g| format!("{}, {} vCPU, {} MiB", g.accel, g.cpus, g.mem_mib))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let caption = format!(
            "fio IOPS (log scale), direct I/O, {} s per job — guests: {} — host: {}",
            report.params.runtime_secs,
            if guests.is_empty() { "none".to_owned() } else { guests.join("; ") },
            report.host.summary()
        );
        let n = report.jobs.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..n - 0.5, (lo..hi).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc("IOPS")
            .y_label_formatter(&|v| if *v >= 1000.0 { format!("{}k", v / 1000.0) } else { format!("{v}") })
            .draw()
            .map_err(err)?;
        let rows: Vec<RowKind> = report.rows.iter().map(|r| r.kind).collect();
        let width = 0.84 / rows.len().max(1) as f64;
        for (ri, &kind) in rows.iter().enumerate() {
            let bars: Vec<(f64, f64, f64, Option<f64>)> = report
                .jobs
                .iter()
                .enumerate()
                .filter_map(|(ji, job)| {
                    let c = report.cell(kind, job)?;
                    let m = c.result.filter(|m| m.iops > 0.0)?;
                    let x0 = ji as f64 - 0.42 + ri as f64 * width;
                    Some((x0, x0 + width * 0.92, m.iops, c.iops_vs_runc))
                })
                .collect();
            let style = color(kind).filled();
            chart
                .draw_series(bars.iter().map(|&(x0, x1, v, _)| Rectangle::new([(x0, lo), (x1, v)], style)))
                .map_err(err)?
                .label(format!("{} ({})", kind.label(), report.row(kind).map(|r| r.runs_on()).unwrap_or_default()))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color(kind).filled()));
            if kind != RowKind::Runc {
                // Upright labels of neighbouring bars would overlap: written bottom to top.
                let font = ("sans-serif", 10).into_font().transform(FontTransform::Rotate270).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
                chart
                    .draw_series(bars.iter().map(|&(x0, x1, v, r)| Text::new(fmt_ratio(r), ((x0 + x1) / 2.0, v * 1.08), font.clone())))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        // Job names under each group, in pixels (outside the plotting area).
        let label = ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        for (ji, job) in report.jobs.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(ji as f64, lo));
            root.draw(&Text::new(job.label(), (px, py + 8), label.clone())).map_err(err)?;
        }
        let foot = ("sans-serif", 11).into_font().color(&BLACK);
        let headline = match report.headline {
            Some(h) => format!("Thinbox virtio-blk rootfs / 9p, 4k randread qd16: {}", fmt_ratio(Some(h))),
            None => "Thinbox virtio-blk rootfs / 9p, 4k randread qd16: no measurement".to_owned(),
        };
        root.draw(&Text::new(
            format!("{headline}. Labels on bars: IOPS / runC. {} UTC, {} mode.", report.started, report.mode),
            (80, HEIGHT as i32 - 16),
            foot,
        ))
        .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::report::tests::sample;

    #[test]
    fn chart_has_a_bar_per_cell_and_every_label() {
        let r = sample("TCG");
        let svg = render(&r).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for want in [
            "runC (overlayfs)",
            "9p",
            "Thinbox virtio-blk rootfs",
            "4k randread qd16",
            "128k seq write qd1",
            "TCG, 2 vCPU, 1024 MiB",
            "AMD EPYC",
            "fio-3.33",
            "4.00×",
        ] {
            assert!(svg.contains(want), "{want} missing");
        }
        // Bars in the three row colours: runC 2, 9p 1 (one cell failed), rootfs 2.
        let count = |rgb: RGBColor| svg.matches(&format!("fill=\"#{:02X}{:02X}{:02X}\"", rgb.0, rgb.1, rgb.2)).count();
        assert_eq!(count(color(RowKind::Runc)), 2 + 1, "two bars and a legend swatch");
        assert_eq!(count(color(RowKind::NineP)), 1 + 1);
        assert_eq!(count(color(RowKind::ThinboxRootfs)), 2 + 1);
        assert!(svg.contains("0.10×") && svg.contains("0.25×"));
    }

    #[test]
    fn empty_report_still_draws() {
        let mut r = sample("TCG");
        for c in &mut r.cells {
            c.result = None;
        }
        r.compute();
        assert!(render(&r).unwrap().contains("no measurement"));
    }
}
