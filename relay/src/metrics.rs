//! The relay's counters in the Prometheus text format, per worker (`[relay] metrics_listen`,
//! off by default): what `psm-perf stats` shows and a scraper collects.

use std::sync::atomic::{AtomicU64, Ordering};

use psm_metrics::{Family, Kind};

use crate::control_link::{Counters, WorkerCounters};
use crate::recording::WorkerRecorder;

/// Gauges that are not per worker.
pub struct Levels {
    /// Unauthenticated connections held now.
    pub unauthenticated: Box<dyn Fn() -> u64 + Send + Sync>,
    /// Whether psm-recorder is connected.
    pub recorder_connected: Box<dyn Fn() -> bool + Send + Sync>,
    /// Age of the oldest relayed byte not yet confirmed durable, in seconds.
    pub recording_lag: Box<dyn Fn() -> f64 + Send + Sync>,
}

type Field = fn(&Counters) -> &AtomicU64;

const PER_WORKER: [(&str, &str, Field); 8] = [
    (
        "psm_relay_connections_total",
        "Connections accepted (SSH and RDP).",
        |c| &c.connections,
    ),
    (
        "psm_relay_startups_refused_total",
        "Connections refused before their handshake (max_startups).",
        |c| &c.startups_refused,
    ),
    (
        "psm_relay_preauth_failures_total",
        "Connections that failed before authenticating.",
        |c| &c.preauth_failures,
    ),
    (
        "psm_relay_auth_failures_total",
        "Failed authentication attempts.",
        |c| &c.auth_failures,
    ),
    (
        "psm_relay_sessions_started_total",
        "Sessions started.",
        |c| &c.sessions_started,
    ),
    ("psm_relay_sessions_ended_total", "Sessions ended.", |c| {
        &c.sessions_ended
    }),
    (
        "psm_relay_bytes_up_total",
        "Session bytes from users toward targets.",
        |c| &c.bytes_up,
    ),
    (
        "psm_relay_bytes_down_total",
        "Session bytes from targets toward users.",
        |c| &c.bytes_down,
    ),
];

/// Every family, as of now.
pub fn families(
    workers: &WorkerCounters,
    recorders: &[WorkerRecorder],
    levels: &Levels,
) -> Vec<Family> {
    let mut out = Vec::new();
    for (name, help, field) in PER_WORKER {
        let mut f = Family::new(name, Kind::Counter, help);
        for (i, c) in workers.0.iter().enumerate() {
            f = f.sample(
                vec![("worker", i.to_string())],
                field(c).load(Ordering::Relaxed) as f64,
            );
        }
        out.push(f);
    }
    // levels kept as two counters (started, ended), so that neither end ever decrements
    let live = |name, help, started: Field, ended: Field| {
        let mut f = Family::new(name, Kind::Gauge, help);
        for (i, c) in workers.0.iter().enumerate() {
            let n = started(c)
                .load(Ordering::Relaxed)
                .saturating_sub(ended(c).load(Ordering::Relaxed));
            f = f.sample(vec![("worker", i.to_string())], n as f64);
        }
        f
    };
    let mut errors = Family::new(
        "psm_relay_errors_total",
        Kind::Counter,
        "Sessions ended, and logins, channels or connections refused, on a fault of the target, psm-recorder, psm-control or psm itself (side); the user's, the policy's and operators' ends and refusals are not counted.",
    );
    let sides: [(&str, Field); 4] = [
        ("target", |c| &c.errors_target),
        ("recorder", |c| &c.errors_recorder),
        ("control", |c| &c.errors_control),
        ("internal", |c| &c.errors_internal),
    ];
    for (i, c) in workers.0.iter().enumerate() {
        for (side, field) in sides {
            errors = errors.sample(
                vec![("worker", i.to_string()), ("side", side.to_string())],
                field(c).load(Ordering::Relaxed) as f64,
            );
        }
    }
    out.push(errors);
    out.push(live(
        "psm_relay_sessions_live",
        "Sessions running now.",
        |c| &c.sessions_started,
        |c| &c.sessions_ended,
    ));
    out.push(live(
        "psm_relay_channels_live",
        "Relayed channels (shells, commands, forwards, the agent) whose tasks still run.",
        |c| &c.channels_opened,
        |c| &c.channels_closed,
    ));
    let per_recorder = |name, kind, help, f: &dyn Fn(&WorkerRecorder) -> u64| {
        let mut fam = Family::new(name, kind, help);
        for (i, r) in recorders.iter().enumerate() {
            fam = fam.sample(vec![("worker", i.to_string())], f(r) as f64);
        }
        fam
    };
    out.push(per_recorder(
        "psm_relay_recording_queue_depth",
        Kind::Gauge,
        "Recording frames in the worker's queue to the recorder link.",
        &|r| r.queue_depth() as u64,
    ));
    out.push(per_recorder(
        "psm_relay_recording_pauses_total",
        Kind::Counter,
        "Times a session's reader stopped on a full durable window or a full recording queue (backpressure; each direction counts).",
        &|r| r.stats().pauses.load(Ordering::Relaxed),
    ));
    out.push(per_recorder(
        "psm_relay_recording_paused",
        Kind::Gauge,
        "Session readers stopped on a full durable window or a full recording queue now (each direction counts).",
        &|r| r.stats().paused_now.load(Ordering::Relaxed),
    ));
    let mut lag = Family::new(
        "psm_relay_recording_worker_lag_seconds",
        Kind::Gauge,
        "Age of the oldest relayed byte of the worker's sessions not yet confirmed durable.",
    );
    for (i, r) in recorders.iter().enumerate() {
        lag = lag.sample(vec![("worker", i.to_string())], r.lag().as_secs_f64());
    }
    out.push(lag);
    out.push(per_recorder(
        "psm_relay_recording_stalls_total",
        Kind::Counter,
        "Recordings failed because psm-recorder confirmed nothing for the stall limit.",
        &|r| r.stats().stalls.load(Ordering::Relaxed),
    ));
    out.push(
        Family::new(
            "psm_relay_unauthenticated",
            Kind::Gauge,
            "Connections not yet authenticated.",
        )
        .sample(vec![], (levels.unauthenticated)() as f64),
    );
    out.push(
        Family::new(
            "psm_relay_recorder_connected",
            Kind::Gauge,
            "1 while psm-recorder is connected.",
        )
        .sample(vec![], f64::from(u8::from((levels.recorder_connected)()))),
    );
    out.push(
        Family::new(
            "psm_relay_recording_lag_seconds",
            Kind::Gauge,
            "Age of the oldest relayed byte psm-recorder has not yet confirmed durable.",
        )
        .sample(vec![], (levels.recording_lag)()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_has_its_own_samples() {
        let w = WorkerCounters::new(2);
        Counters::bump(&w.0[1].sessions_started);
        Counters::bump(&w.0[1].sessions_started);
        Counters::bump(&w.0[1].sessions_ended);
        w.0[0].bytes_up.fetch_add(10, Ordering::Relaxed);
        // a target's fault counts; a policy's refusal and the user's own end do not
        w.0[1].fault(crate::end::Side::Target);
        w.0[1].fault(crate::end::Side::Policy);
        w.0[1].fault(crate::end::Side::Client);
        w.0[0].fault(crate::end::Side::Recorder);
        let levels = Levels {
            unauthenticated: Box::new(|| 3),
            recorder_connected: Box::new(|| true),
            recording_lag: Box::new(|| 0.25),
        };
        let text = psm_metrics::render(&families(&w, &[], &levels));
        let s = psm_metrics::parse(&text);
        let get = |name: &str, worker: Option<&str>| {
            s.iter()
                .find(|x| x.name == name && x.label("worker") == worker)
                .map(|x| x.value)
        };
        assert_eq!(get("psm_relay_sessions_live", Some("1")), Some(1.0));
        assert_eq!(get("psm_relay_sessions_live", Some("0")), Some(0.0));
        assert_eq!(get("psm_relay_bytes_up_total", Some("0")), Some(10.0));
        assert_eq!(get("psm_relay_unauthenticated", None), Some(3.0));
        assert_eq!(get("psm_relay_recorder_connected", None), Some(1.0));
        assert_eq!(get("psm_relay_recording_lag_seconds", None), Some(0.25));
        let error = |worker: &str, side: &str| {
            s.iter()
                .find(|x| {
                    x.name == "psm_relay_errors_total"
                        && x.label("worker") == Some(worker)
                        && x.label("side") == Some(side)
                })
                .map(|x| x.value)
        };
        assert_eq!(error("1", "target"), Some(1.0));
        assert_eq!(error("1", "recorder"), Some(0.0));
        assert_eq!(error("0", "recorder"), Some(1.0));
        assert_eq!(error("0", "internal"), Some(0.0));
        let all: f64 = s
            .iter()
            .filter(|x| x.name == "psm_relay_errors_total")
            .map(|x| x.value)
            .sum();
        assert_eq!(
            all, 2.0,
            "only the target's and the recorder's faults count"
        );
    }
}
