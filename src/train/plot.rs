//! `curves.png`: loss, reward accuracy and margins over steps, train and eval.
use super::metrics::Row;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a system font for labels once; without one the curves are drawn unlabelled.
fn font_available() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        for f in FONTS {
            if let Ok(bytes) = std::fs::read(f) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn series(rows: &[(usize, Row)], key: &str) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|(s, r)| Some((*s as f64, *r.get(key)?))).collect()
}

pub fn curves(path: &Path, rows: &[(usize, Row)]) -> Result<()> {
    // KTO's rows are unpaired: no accuracy, but the KL estimate its loss is centred on.
    let middle = if rows.iter().any(|(_, r)| r.contains_key("kl")) { ("KL estimate", "kl") } else { ("reward accuracy", "rewards/accuracies") };
    panels(path, rows, &[("loss", "loss"), middle, ("reward margin", "rewards/margins")], "step")
}

/// One panel per (title, key): `key` in blue (train) and `eval/key` in red, over x.
pub fn panels(path: &Path, rows: &[(usize, Row)], keys: &[(&str, &str)], x_desc: &str) -> Result<()> {
    let labels = font_available();
    let tmp = path.with_extension("partial.png");
    {
        let root = BitMapBackend::new(&tmp, (500 * keys.len() as u32, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let areas = root.split_evenly((1, keys.len()));
        for (panel, &(title, key)) in areas.iter().zip(keys) {
            let train = series(rows, key);
            let eval = series(rows, &format!("eval/{key}"));
            let all: Vec<&(f64, f64)> = train.iter().chain(eval.iter()).collect();
            if all.is_empty() {
                continue;
            }
            let (x_max, mut y_min, mut y_max) =
                all.iter().fold((1.0f64, f64::MAX, f64::MIN), |(x, lo, hi), p| (x.max(p.0), lo.min(p.1), hi.max(p.1)));
            if (y_max - y_min).abs() < 1e-9 {
                y_min -= 0.5;
                y_max += 0.5;
            }
            let pad = 0.05 * (y_max - y_min);
            let mut b = ChartBuilder::on(panel);
            b.margin(15);
            if labels {
                b.caption(title, ("sans-serif", 22)).x_label_area_size(35).y_label_area_size(55);
            }
            let mut chart = b.build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad)).map_err(|e| anyhow!("{e}"))?;
            let mut mesh = chart.configure_mesh();
            if labels {
                mesh.x_desc(x_desc);
            } else {
                mesh.disable_x_mesh().disable_y_mesh();
            }
            mesh.draw().map_err(|e| anyhow!("{e}"))?;
            let s = chart.draw_series(LineSeries::new(train, &BLUE)).map_err(|e| anyhow!("{e}"))?;
            if labels {
                s.label("train").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            }
            chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled()))).map_err(|e| anyhow!("{e}"))?;
            let s = chart.draw_series(LineSeries::new(eval, RED.stroke_width(2))).map_err(|e| anyhow!("{e}"))?;
            if labels {
                s.label("eval").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
                chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| anyhow!("{e}"))?;
            }
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    crate::store::atomic::rename_durable(&tmp, path)
}
