//! Two small SVG chart kinds, written as text (no font or rendering library: the viewer
//! lays out the text): lines over a numeric x axis, and a heat map of values in [0, 1].

use std::fmt::Write;

const PALETTE: [&str; 8] = [
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// About five round tick values covering `[lo, hi]` (a range of one value is widened).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (lo, hi) = if hi - lo > 1e-9 * hi.abs().max(lo.abs()).max(1.0) {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    let span = hi - lo;
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    let mut v = (lo / step).floor() * step;
    let mut out = vec![];
    // The step is at least a fifth of the span's order of magnitude: a few dozen ticks
    // at most, however large the values.
    while out.last().is_none_or(|&l| l < hi - step * 1e-9) && out.len() < 64 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v == v.round() && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A line chart: one polyline with markers per series; `zero` draws the line y = 0.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    zero: bool,
) -> String {
    let (w, h) = (720.0, 440.0);
    let (l, r, t, b) = (70.0, 170.0, 40.0, 50.0);
    let pts = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if zero {
        y0 = y0.min(0.0);
        y1 = y1.max(0.0);
    }
    let (xt, yt) = (ticks(x0, x1), ticks(y0, y1));
    let (x0, x1) = (xt[0].min(x0), xt.last().copied().unwrap_or(x1).max(x1));
    let (y0, y1) = (yt[0].min(y0), yt.last().copied().unwrap_or(y1).max(y1));
    let px = |x: f64| l + (x - x0) / (x1 - x0).max(1e-12) * (w - l - r);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0).max(1e-12) * (h - t - b);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (l + w - r) / 2.0,
        esc(title)
    );
    for &v in &xt {
        let x = px(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{}" stroke="#e0e0e0"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - b,
            h - b + 16.0,
            fmt_tick(v)
        );
    }
    for &v in &yt {
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - r,
            l - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    if zero {
        let y = py(0.0);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#888888"/>"##,
            w - r
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#444444"/>"##,
        w - l - r,
        h - t - b
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (l + w - r) / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (t + h - b) / 2.0,
        esc(y_label)
    );
    for (i, (name, p)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let finite: Vec<(f64, f64)> = p.iter().copied().filter(|q| q.1.is_finite()).collect();
        let path: Vec<String> = finite
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(x, y) in &finite {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                px(x),
                py(y)
            );
        }
        let ly = t + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            w - r + 12.0,
            w - r + 36.0,
            w - r + 42.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A heat map: `values[row][col]` in [0, 1] (`None`: not measured), red at 0 to green
/// at 1, each cell labelled with its value in percent.
pub fn heatmap(
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
) -> String {
    let (cw, ch, l, t) = (46.0, 22.0, 170.0, 70.0);
    let w = l + cw * cols.len() as f64 + 20.0;
    let h = t + ch * rows.len() as f64 + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">{}</text>"#,
        esc(title)
    );
    for (j, c) in cols.iter().enumerate() {
        let x = l + cw * (j as f64 + 0.5);
        let _ = writeln!(
            s,
            r#"<text transform="translate({x:.1} {}) rotate(-45)" text-anchor="start">{}</text>"#,
            t - 6.0,
            esc(c)
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y = t + ch * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            l - 6.0,
            y + ch * 0.7,
            esc(r)
        );
        for (j, v) in values[i].iter().enumerate() {
            let x = l + cw * j as f64;
            let (fill, label) = match v {
                Some(v) => {
                    let v = v.clamp(0.0, 1.0);
                    let (red, green) = ((220.0 * (1.0 - v)) as u8 + 30, (180.0 * v) as u8 + 60);
                    (
                        format!("rgb({red},{green},70)"),
                        format!("{:.0}", 100.0 * v),
                    )
                }
                None => ("#dddddd".to_string(), "–".to_string()),
            };
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{cw}" height="{ch}" fill="{fill}" stroke="white"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="white">{label}</text>"#,
                x + cw / 2.0,
                y + ch * 0.7
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let unit = ticks(0.0, 1.0);
        assert_eq!(unit.len(), 6, "{unit:?}");
        for (i, v) in unit.iter().enumerate() {
            assert!((v - 0.2 * i as f64).abs() < 1e-12, "{unit:?}");
        }
        let t = ticks(-3.2, 41.0);
        assert!(t[0] <= -3.2 && *t.last().unwrap() >= 41.0, "{t:?}");
        assert_eq!(t[1] - t[0], 10.0);
        let one = ticks(4096.0, 4096.0);
        assert!(
            one.len() < 10 && one[0] <= 4096.0 && *one.last().unwrap() >= 4096.0,
            "{one:?}"
        );
    }

    #[test]
    fn charts_are_well_formed() {
        let s = lines(
            "a < b",
            "x",
            "y",
            &[("p".into(), vec![(1.0, 2.0), (2.0, f64::NAN), (3.0, -1.0)])],
            true,
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("a &lt; b"));
        assert_eq!(s.matches("<circle").count(), 2, "the NaN point is skipped");
        let m = heatmap(
            "h",
            &["r".into()],
            &["c1".into(), "c2".into()],
            &[vec![Some(1.0), None]],
        );
        assert!(m.contains(">100<") && m.contains(">–<"));
    }
}
