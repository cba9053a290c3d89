//! A latency-percentile plot as a self-contained SVG: x is the percentile on a log scale of
//! 1/(1−q) (50 %, 90 %, 99 %, 99.9 %, 99.99 %), y the latency in µs on a log scale.
//!
//! Invariant: pure string building; no fonts or scripts outside the file.

use std::fmt::Write as _;

/// One line of the plot: its name, its colour, and its (quantile, µs) points.
pub type Series<'a> = (String, &'a str, Vec<(f64, f64)>);

/// Renders `series` under `title`.
pub fn percentile_svg(title: &str, series: &[Series<'_>]) -> String {
    const W: f64 = 760.0;
    const H: f64 = 420.0;
    const L: f64 = 70.0;
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    let x_of = |q: f64| {
        let decades = (1.0 / (1.0 - q.min(0.999_99))).log10(); // 0 .. 5
        L + (W - L - R) * decades / 5.0
    };
    let all: Vec<f64> = series.iter().flat_map(|(_, _, p)| p.iter().map(|(_, v)| *v)).filter(|v| *v > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0).log10().floor();
    let hi = all.iter().copied().fold(1.0, f64::max).log10().ceil().max(lo + 1.0);
    let y_of = |v: f64| T + (H - T - B) * (1.0 - (v.max(1.0).log10() - lo) / (hi - lo));
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    for (q, label) in
        [(0.0, "0%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%"), (0.9999, "99.99%"), (0.99999, "99.999%")]
    {
        let x = x_of(q);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            H - B,
            H - B + 18.0
        );
    }
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        let y = y_of(v);
        let _ = write!(
            svg,
            r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{} µs</text>"##,
            W - R,
            L - 6.0,
            y + 4.0,
            v
        );
        d += 1.0;
    }
    let _ = write!(svg, r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#, W / 2.0, H - 12.0);
    for (i, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points.iter().map(|(q, v)| format!("{:.1},{:.1}", x_of(*q), y_of(*v))).collect();
        let _ =
            write!(svg, r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#, path.join(" "));
        let ly = T + 16.0 * i as f64 + 10.0;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="14" height="3" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            L + 10.0,
            ly - 4.0,
            L + 30.0,
            ly,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plot is one SVG document with a polyline per series and its legend.
    #[test]
    fn renders() {
        let svg = percentile_svg("t <1>", &[("up".into(), "#c00", vec![(0.0, 100.0), (0.99, 900.0), (1.0, 5000.0)])]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("t &lt;1&gt;") && svg.contains(">up<"));
    }
}
