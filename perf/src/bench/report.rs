//! The bench's table: a [`Row`] per figure with its value on each route, the helpers that make
//! figures of transfers (MB/s, CPU-seconds per GiB, medians of rounds), and the table and JSON
//! the rows are rendered as.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Opts;

/// One line of the table: a workload's figure on each route, or why it failed there.
pub(super) struct Row {
    pub(super) workload: String,
    unit: &'static str,
    /// Higher is better (throughput) or lower (latency, CPU).
    higher_better: bool,
    pub(super) values: BTreeMap<&'static str, Result<f64, String>>,
}

impl Row {
    pub(super) fn new(workload: impl Into<String>, unit: &'static str, higher_better: bool) -> Row {
        Row {
            workload: workload.into(),
            unit,
            higher_better,
            values: BTreeMap::new(),
        }
    }
    /// Sets the figure of `route`, and says it on stderr at once: a run stopped at its time
    /// limit has still told what it measured.
    pub(super) fn set(&mut self, route: &'static str, v: anyhow::Result<f64>) {
        let v = v.map_err(|e| format!("{e:#}"));
        match &v {
            Ok(x) => eprintln!(
                "bench:   {} via {route}: {x:.3} {}",
                self.workload, self.unit
            ),
            Err(e) => eprintln!("bench:   {} via {route}: FAILED {e}", self.workload),
        }
        self.values.insert(route, v);
    }
    pub(super) fn get(&self, route: &str) -> Option<f64> {
        self.values
            .get(route)
            .and_then(|v| v.as_ref().ok().copied())
    }
}

/// Sets a transfer's two figures on `route`: MB/s in `tput` and CPU-seconds per GiB in `cpu`,
/// from the seconds it took moving `bytes` and the CPU-seconds spent (or why it failed, in both).
pub(super) fn set_transfer(
    tput: &mut Row,
    cpu: &mut Row,
    route: &'static str,
    bytes: u64,
    r: anyhow::Result<(f64, f64)>,
) {
    set_medians(tput, cpu, route, vec![transfer_figures(bytes, r)]);
}

/// A transfer's MB/s and CPU-seconds per GiB, from the seconds it took moving `bytes` and the
/// CPU-seconds spent.
pub(super) fn transfer_figures(
    bytes: u64,
    r: anyhow::Result<(f64, f64)>,
) -> anyhow::Result<(f64, f64)> {
    r.map(|(secs, spent)| {
        (
            mbps(bytes, secs),
            spent / (bytes as f64 / (1u64 << 30) as f64),
        )
    })
}

/// Sets `route`'s MB/s in `tput` and CPU-seconds per GiB in `cpu`: each the median of the
/// rounds' figures (`rounds`: one per round), or the first round's failure when one failed.
pub(super) fn set_medians(
    tput: &mut Row,
    cpu: &mut Row,
    route: &'static str,
    rounds: Vec<anyhow::Result<(f64, f64)>>,
) {
    match rounds.into_iter().collect::<anyhow::Result<Vec<_>>>() {
        Ok(figures) => {
            tput.set(route, Ok(median(figures.iter().map(|f| f.0).collect())));
            cpu.set(route, Ok(median(figures.iter().map(|f| f.1).collect())));
        }
        Err(e) => {
            cpu.set(route, Err(anyhow::anyhow!("{e:#}")));
            tput.set(route, Err(e));
        }
    }
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(super) fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn fmt(v: Option<&Result<f64, String>>) -> String {
    match v {
        None => "-".into(),
        Some(Err(_)) => "FAILED".into(),
        Some(Ok(x)) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(Ok(x)) => format!("{x:.3}"),
    }
}

fn ratio(row: &Row, a: &str, b: &str) -> String {
    match (row.get(a), row.get(b)) {
        (Some(x), Some(y)) if y != 0.0 => format!("{:.2}x", x / y),
        _ => "-".into(),
    }
}

pub(super) fn render(rows: &[Row], notes: &[String]) -> String {
    let mut out = format!(
        "{:<44} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}\n",
        "workload",
        "direct",
        "psm",
        "psm-norec",
        "jump",
        "openssh",
        "socat",
        "psm/direct",
        "psm/other",
        "psm/openssh",
        "psm/norec"
    );
    for r in rows {
        let other = if r.values.contains_key("socat") {
            "socat"
        } else {
            "jump"
        };
        out.push_str(&format!(
            "{:<44} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}\n",
            format!("{} ({})", r.workload, r.unit),
            fmt(r.values.get("direct")),
            fmt(r.values.get("psm")),
            fmt(r.values.get("psm-norec")),
            fmt(r.values.get("jump")),
            fmt(r.values.get("openssh")),
            fmt(r.values.get("socat")),
            ratio(r, "psm", "direct"),
            ratio(r, "psm", other),
            ratio(r, "psm", "openssh"),
            ratio(r, "psm", "psm-norec"),
        ));
    }
    for r in rows {
        for (route, v) in &r.values {
            if let Err(e) = v {
                out.push_str(&format!("FAILED {} on {route}: {e}\n", r.workload));
            }
        }
    }
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

pub(super) fn to_json(rows: &[Row], notes: &[String], o: &Opts) -> Value {
    json!({
        "quick": o.quick,
        "mib": o.mib,
        "repeat": o.repeat,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rows": rows.iter().map(|r| {
            let mut m = serde_json::Map::new();
            m.insert("workload".into(), json!(r.workload));
            m.insert("unit".into(), json!(r.unit));
            m.insert("higher_better".into(), json!(r.higher_better));
            for (route, v) in &r.values {
                m.insert((*route).into(), match v {
                    Ok(x) => json!(x),
                    Err(e) => json!({ "error": e }),
                });
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "notes": notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![900.0, 500.0, 700.0]), 700.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![605.0]), 605.0);
        assert!(median(Vec::new()).is_nan());
    }

    /// The rounds of one route: the median of each figure, taken apart (the fastest round need
    /// not be the cheapest), or the failure when a round failed.
    #[test]
    fn a_route_gets_each_figures_median_or_its_failure() {
        let mut tput = Row::new("up aes128-gcm", "MB/s", true);
        let mut cpu = Row::new("up aes128-gcm CPU", "CPU-s/GiB", false);
        set_medians(
            &mut tput,
            &mut cpu,
            "psm",
            vec![Ok((1000.0, 0.9)), Ok((1200.0, 0.8)), Ok((1100.0, 1.0))],
        );
        assert_eq!(tput.values["psm"].as_ref().ok(), Some(&1100.0));
        assert_eq!(cpu.values["psm"].as_ref().ok(), Some(&0.9));
        set_medians(
            &mut tput,
            &mut cpu,
            "jump",
            vec![Ok((600.0, 0.5)), Err(anyhow::anyhow!("timed out"))],
        );
        assert!(tput.values["jump"]
            .as_ref()
            .is_err_and(|e| e.contains("timed out")));
        assert!(cpu.values["jump"].is_err());
        // one transfer: the figures of that transfer
        set_transfer(&mut tput, &mut cpu, "direct", 1 << 30, Ok((1.0, 0.5)));
        assert_eq!(
            tput.values["direct"].as_ref().ok(),
            Some(&mbps(1 << 30, 1.0))
        );
        assert_eq!(cpu.values["direct"].as_ref().ok(), Some(&0.5));
    }
}
