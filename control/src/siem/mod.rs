//! SIEM export: the audit stream, as it is written, to any number of syslog receivers.
//!
//! - [`Tap::offer`] is called by [`crate::audit::AuditLog::append`] with every line it wrote
//!   (the event with its hash-chain fields): it appends the line to each sink's disk queue ([`queue`], `siem/<sink>/`) and wakes the
//!   sink's delivery task. That is a local file append per sink; nothing on that path waits on a
//!   network, so a sink that is down or slow never holds up the audit log or a session.
//! - Each sink has its own delivery task: it connects ([`transport`]: UDP, TCP or TLS with
//!   rustls), formats each queued event as an RFC 5424 message ([`mod@format`]: JSON, CEF or OCSF),
//!   sends them in `seq` order, and records each as delivered ([`queue`]) before the next. It
//!   reconnects with a backoff (0.2 s doubling to 5 s) and resumes at the first undelivered
//!   event.
//! - A queue at its bound keeps its oldest undelivered events and drops new ones for that sink
//!   only: one `notice` audit event (kind `siem events dropped`) and a log line when dropping
//!   starts, one more with the total when the sink has room again, and the count in `psmctl
//!   status`. Other sinks and the audit log are untouched.
//!
//! What it does not do: read anything from the receivers, resend what a receiver lost after
//! accepting it, or deliver events audited before a sink was configured.

pub mod config;
pub mod format;
pub mod queue;
pub mod tls;
pub mod transport;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use psm_control_api::AuditKind;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{error, info, warn};

use config::SinkConfig;
use format::Header;
use queue::{DiskQueue, Pushed};
use transport::Conn;

pub use crate::protocol::SinkStatus;

/// The notice kind of drop reports.
pub const DROP_NOTICE_KIND: &str = "siem events dropped";
/// Events a delivery task reads from its queue at once.
const BATCH: usize = 64;
/// First and longest wait between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Sink {
    config: SinkConfig,
    header: Header,
    tls: Option<Arc<rustls::ClientConfig>>,
    queue: Mutex<DiskQueue>,
    wake: Notify,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// While dropping: the dropped total before the episode began.
    dropping: Mutex<Option<u64>>,
    notices: mpsc::UnboundedSender<AuditKind>,
}

impl Sink {
    fn offer(&self, seq: u64, line: &[u8]) {
        let (pushed, dropped_total, pending, pending_bytes) = {
            let mut q = lock(&self.queue);
            let p = q.push(seq, line);
            (p, q.state().dropped, q.pending(), q.pending_bytes())
        };
        let name = &self.config.name;
        match pushed {
            Pushed::Queued => {
                self.wake.notify_one();
                if let Some(before) = lock(&self.dropping).take() {
                    let n = dropped_total - before;
                    warn!(sink = %name, dropped = n, "SIEM sink has room again; events were dropped for it");
                    let _ = self.notices.send(AuditKind::Notice {
                        message: format!(
                            "SIEM sink {name}: {n} event(s) were dropped while its queue was full; delivery goes on from seq {seq}"
                        ),
                        session_id: None,
                        kind: Some(DROP_NOTICE_KIND.into()),
                        count: Some(n),
                    });
                }
            }
            Pushed::Duplicate => {}
            Pushed::DroppedFull | Pushed::DroppedIo => {
                let mut dropping = lock(&self.dropping);
                if dropping.is_none() {
                    *dropping = Some(dropped_total - 1);
                    let why = if pushed == Pushed::DroppedFull {
                        format!(
                            "its queue is full ({pending} events, {pending_bytes} bytes; bound {} events, {} bytes)",
                            self.config.queue_max_events, self.config.queue_max_bytes
                        )
                    } else {
                        "its queue cannot be written".to_string()
                    };
                    error!(sink = %name, seq, %why, "SIEM sink is dropping events");
                    let _ = self.notices.send(AuditKind::Notice {
                        message: format!(
                            "SIEM sink {name}: {why}; newer events are dropped for this sink until it catches up (first dropped: seq {seq})"
                        ),
                        session_id: None,
                        kind: Some(DROP_NOTICE_KIND.into()),
                        count: Some(1),
                    });
                }
            }
        }
    }

    fn status(&self) -> SinkStatus {
        let q = lock(&self.queue);
        SinkStatus {
            name: self.config.name.clone(),
            transport: self.config.transport.name().into(),
            address: self.config.address.clone(),
            format: self.config.format.name().into(),
            connected: self.connected.load(Ordering::Relaxed),
            queued: q.pending(),
            queued_bytes: q.pending_bytes(),
            delivered: q.state().delivered,
            delivered_seq: q.state().delivered_seq,
            dropped: q.state().dropped,
            dropping: lock(&self.dropping).is_some(),
            last_error: lock(&self.last_error).clone(),
        }
    }

    fn set_error(&self, e: Option<String>) {
        let mut last = lock(&self.last_error);
        if let Some(msg) = &e {
            if last.as_ref() != Some(msg) {
                warn!(sink = %self.config.name, address = %self.config.address, error = %msg, "SIEM sink cannot deliver");
            }
        }
        *last = e;
    }

    /// The delivery loop; returns when `stop` turns true.
    async fn run(self: Arc<Sink>, mut stop: watch::Receiver<bool>) {
        let name = self.config.name.clone();
        let mut conn: Option<Conn> = None;
        let mut backoff = BACKOFF_MIN;
        // After a lost connection, wait before the next one: a receiver that accepts and closes
        // at once must not make this a busy loop.
        let mut pause = false;
        loop {
            if *stop.borrow() || stop.has_changed().is_err() {
                break;
            }
            let Some(c) = conn.as_mut() else {
                if std::mem::take(&mut pause) {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                match Conn::connect(
                    &self.config.transport,
                    &self.config.address,
                    self.tls.as_ref(),
                )
                .await
                {
                    Ok(c) => {
                        info!(sink = %name, address = %self.config.address, transport = self.config.transport.name(), "SIEM sink connected");
                        conn = Some(c);
                        self.connected.store(true, Ordering::Relaxed);
                        self.set_error(None);
                    }
                    Err(e) => {
                        self.connected.store(false, Ordering::Relaxed);
                        self.set_error(Some(format!("connect: {e}")));
                        pause = true;
                    }
                }
                continue;
            };
            let batch = lock(&self.queue).peek(BATCH);
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    self.set_error(Some(format!("queue: {e}")));
                    tokio::select! {
                        _ = tokio::time::sleep(BACKOFF_MAX) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                let closed = tokio::select! {
                    _ = self.wake.notified() => false,
                    _ = c.closed() => true,
                    _ = stop.changed() => false,
                };
                if closed {
                    info!(sink = %name, "SIEM receiver closed the connection");
                    self.lost(&mut conn, "the receiver closed the connection".into());
                    pause = true;
                }
                continue;
            }
            for item in &batch {
                let Some(c) = conn.as_mut() else { break };
                if !c.alive().await {
                    self.lost(&mut conn, "the receiver closed the connection".into());
                    pause = true;
                    break;
                }
                let msg = format::syslog_message(&self.header, self.config.format, &item.line);
                if let Err(e) = c.send(&msg).await {
                    self.lost(&mut conn, format!("send: {e}"));
                    pause = true;
                    break;
                }
                backoff = BACKOFF_MIN;
                if let Err(e) = lock(&self.queue).ack(item) {
                    error!(sink = %name, seq = item.seq, error = %e, "cannot record a delivered event; it may be sent again after a restart");
                }
            }
        }
        if let Some(mut c) = conn.take() {
            c.shutdown().await;
        }
        if let Err(e) = lock(&self.queue).flush_state() {
            error!(sink = %name, error = %e, "cannot save the SIEM queue's counters");
        }
    }

    fn lost(&self, conn: &mut Option<Conn>, why: String) {
        *conn = None;
        self.connected.store(false, Ordering::Relaxed);
        self.set_error(Some(why));
    }
}

/// What [`crate::audit::AuditLog`] hands every appended event to.
#[derive(Clone)]
pub struct Tap {
    sinks: Arc<[Arc<Sink>]>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl Tap {
    /// Queues one line of `audit.jsonl` (a JSON object with its `seq`) for every sink. Never
    /// waits on a network.
    pub fn offer(&self, line: &[u8]) {
        let Some(seq) = queue::line_seq(line) else {
            error!("an audit line without a seq was not exported");
            return;
        };
        for s in self.sinks.iter() {
            s.offer(seq, line);
        }
    }
}

/// The running sinks.
pub struct Siem {
    sinks: Arc<[Arc<Sink>]>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    notices: Mutex<Option<mpsc::UnboundedReceiver<AuditKind>>>,
}

/// The machine's host name as a syslog HOSTNAME (`-` when unknown).
fn host_name() -> String {
    let h = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let h: String = h
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if h.is_empty() {
        "-".into()
    } else {
        h
    }
}

impl Siem {
    /// Opens every sink's queue under `data_dir/siem/` and starts its delivery task (call it
    /// inside a tokio runtime). No sinks: nothing runs.
    pub fn start(data_dir: &Path, configs: &[SinkConfig]) -> Result<Siem, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let mut sinks = Vec::with_capacity(configs.len());
        for c in configs {
            let dir = data_dir.join("siem").join(&c.name);
            let queue = DiskQueue::open(&dir, c.queue_max_events, c.queue_max_bytes)
                .map_err(|e| format!("SIEM sink {}: cannot open its queue: {e}", c.name))?;
            let tls = match &c.transport {
                config::Transport::Tls(files) => Some(
                    tls::client_config(files).map_err(|e| format!("SIEM sink {}: {e}", c.name))?,
                ),
                _ => None,
            };
            info!(sink = %c.name, transport = c.transport.name(), address = %c.address, format = c.format.name(), queued = queue.pending(), "SIEM sink configured");
            sinks.push(Arc::new(Sink {
                header: Header {
                    facility: c.facility,
                    hostname: c.hostname.clone().unwrap_or_else(host_name),
                    app_name: c.app_name.clone(),
                    procid: std::process::id(),
                },
                config: c.clone(),
                tls,
                queue: Mutex::new(queue),
                wake: Notify::new(),
                connected: AtomicBool::new(false),
                last_error: Mutex::new(None),
                dropping: Mutex::new(None),
                notices: tx.clone(),
            }));
        }
        let sinks: Arc<[Arc<Sink>]> = sinks.into();
        let tasks = sinks
            .iter()
            .map(|s| tokio::spawn(s.clone().run(stop_rx.clone())))
            .collect();
        Ok(Siem {
            sinks,
            stop,
            tasks: Mutex::new(tasks),
            notices: Mutex::new(Some(rx)),
        })
    }

    /// The tap for the audit log; `None` without sinks.
    pub fn tap(&self) -> Option<Tap> {
        (!self.sinks.is_empty()).then(|| Tap {
            sinks: self.sinks.clone(),
        })
    }

    /// Hands the sinks' own audit events (drop reports) to `append`, from a task of its own
    /// (they cannot be appended from inside the append that caused them).
    pub fn forward_notices<F: Fn(AuditKind) + Send + 'static>(&self, append: F) {
        if let Some(mut rx) = lock(&self.notices).take() {
            tokio::spawn(async move {
                while let Some(kind) = rx.recv().await {
                    append(kind);
                }
            });
        }
    }

    /// Each sink's state, for `psmctl status`.
    pub fn status(&self) -> Vec<SinkStatus> {
        self.sinks.iter().map(|s| s.status()).collect()
    }

    /// Stops the delivery tasks (each closes its connection and saves its counters); bounded.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
    }
}

#[cfg(test)]
mod tests;
