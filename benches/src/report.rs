//! Result rows: medians over runs, a markdown table, JSON.

use serde::Serialize;

/// The median of `samples` (mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The 99th percentile of `samples`, nearest rank: the smallest sample
/// with at least 99% of the samples at or below it. With fewer than 100
/// samples that is the largest one, so it is defined for any `--runs`.
pub fn p99(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (samples.len() * 99).div_ceil(100);
    v[rank.max(1) - 1]
}

/// One measured quantity over repeated runs.
#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    /// Median over runs.
    pub median: f64,
    /// 99th percentile over runs (nearest rank; the largest below 100 runs).
    pub p99: f64,
    /// Unit of the values.
    pub unit: &'static str,
    /// Every run's value, in run order.
    pub samples: Vec<f64>,
}

impl Stat {
    /// A statistic over `samples`.
    pub fn new(samples: Vec<f64>, unit: &'static str) -> Self {
        Self {
            median: median(&samples),
            p99: p99(&samples),
            unit,
            samples,
        }
    }

    fn show(&self) -> String {
        let v = self.median;
        let num = if v.abs() >= 1000.0 {
            format!("{v:.0}")
        } else if v.abs() >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        };
        format!("{num} {}", self.unit)
    }
}

/// How a ratio is judged against its target.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum Goal {
    /// The ratio must be at least this.
    AtLeast(f64),
    /// The ratio must be at most this.
    AtMost(f64),
    /// Reported only.
    None,
}

/// One row of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Benchmark id (B1..B7, MEM).
    pub id: String,
    /// What is measured.
    pub what: String,
    /// ms2m's number.
    pub ours: Stat,
    /// What it is compared against, if anything.
    pub baseline_name: String,
    /// The baseline's number.
    pub baseline: Option<Stat>,
    /// Median of the per-run ratios (how the target is stated).
    pub ratio: Option<Stat>,
    /// The target as text.
    pub target: String,
    /// The target as a rule.
    pub goal: Goal,
    /// Whether the target is met (`None`: no target for this row).
    pub met: Option<bool>,
    /// Delivery mode, sizes, caveats.
    pub notes: String,
}

impl Row {
    /// A row; `met` is derived from `ratio` and `goal`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        what: impl Into<String>,
        ours: Stat,
        baseline_name: impl Into<String>,
        baseline: Option<Stat>,
        ratio: Option<Stat>,
        target: impl Into<String>,
        goal: Goal,
        notes: impl Into<String>,
    ) -> Self {
        let met = match (&ratio, goal) {
            (Some(r), Goal::AtLeast(t)) => Some(r.median >= t),
            (Some(r), Goal::AtMost(t)) => Some(r.median <= t),
            _ => None,
        };
        Self {
            id: id.into(),
            what: what.into(),
            ours,
            baseline_name: baseline_name.into(),
            baseline,
            ratio,
            target: target.into(),
            goal,
            met,
            notes: notes.into(),
        }
    }
}

/// Per-run ratios `a[i] / b[i]`.
pub fn ratios(a: &[f64], b: &[f64]) -> Stat {
    Stat::new(a.iter().zip(b).map(|(x, y)| x / y).collect(), "×")
}

/// The results as a markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| id | what | ms2m (median) | compared against | baseline (median) | ratio (median) | target | met | runs | notes |\n");
    out.push_str("|---|---|---:|---|---:|---:|---|---|---:|---|\n");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.id,
            r.what,
            r.ours.show(),
            if r.baseline_name.is_empty() {
                "—"
            } else {
                &r.baseline_name
            },
            r.baseline.as_ref().map_or("—".into(), Stat::show),
            r.ratio.as_ref().map_or("—".into(), |s| format!("{:.3}", s.median)),
            r.target,
            met,
            r.ours.samples.len(),
            r.notes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::p99;

    #[test]
    fn p99_is_the_largest_below_a_hundred_samples() {
        assert_eq!(p99(&[3.0, 1.0, 2.0]), 3.0);
    }

    #[test]
    fn p99_leaves_out_the_top_percent() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(p99(&samples), 198.0);
    }
}
