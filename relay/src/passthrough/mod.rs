//! Zero-copy TCP pass-through. A `tcp` target (a database port, an appliance's management port)
//! is served on a psm port of its own (`Target::listen`). Plain TCP carries no identity, so a
//! user first opens a *lease*: an SSH login to the target's `tcp` account (MFA, reason and
//! approval as for any grant) that holds while the session lasts (see `session::lease`). While
//! it lasts, connections from the lease's source address to the target's psm port are decided
//! again, dialled and relayed with splice(2), unrecorded (the grant must say `unrecorded_tcp`),
//! each audited when it closes; when the lease ends, its connections are cut.

pub mod splice;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use psm_control_api::{decide, now_ms, Attempt, AuditKind, Escaped, Protocol, TCP_ACCOUNT};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::control_link::SessionBytes;
use crate::end::Side;
use crate::session::WorkerCtx;
use crate::startups::LogLimiter;

/// How long dialling a `tcp` target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one lease relays at once: each holds two sockets and two pipes, so anyone at
/// the lease's address could otherwise run the relay out of descriptors.
pub const MAX_LEASE_CONNECTIONS: u32 = 256;

/// An open lease, as a pass-through connection sees it.
#[derive(Clone)]
pub struct Lease {
    id: u64,
    /// The lease's session.
    pub session_id: String,
    /// psm user holding it.
    pub user: String,
    /// The session's byte counts (pass-through bytes are added to them).
    pub bytes: Arc<SessionBytes>,
    /// Connections relayed under it so far (numbers them in the audit log).
    connections: Arc<AtomicU32>,
    /// Connections it relays now (at most [`MAX_LEASE_CONNECTIONS`]).
    open: Arc<AtomicU32>,
    /// Changes (errors) when the lease ends.
    end: watch::Receiver<()>,
}

/// Holds a lease open; dropping it ends the lease and cuts its connections.
pub struct LeaseGuard {
    leases: Arc<Leases>,
    key: (String, IpAddr),
    id: u64,
    _end: watch::Sender<()>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut t = self.leases.lock();
        if let Some(v) = t.get_mut(&self.key) {
            v.retain(|l| l.id != self.id);
            if v.is_empty() {
                t.remove(&self.key);
            }
        }
    }
}

/// The relay-wide table of open leases, by (target, source address); touched when a lease
/// opens or ends and when a pass-through connection is accepted, never per byte.
pub struct Leases {
    table: Mutex<HashMap<(String, IpAddr), Vec<Lease>>>,
    next: AtomicU64,
    /// Refusals logged and audited: at most 20 a second for the whole relay, connections
    /// without a lease (anyone who reaches the port) apart from lease holders' refusals, so a
    /// flood of the first cannot hide the second.
    refusals: Mutex<LogLimiter>,
    no_lease: Mutex<LogLimiter>,
    /// psm's own SSH and RDP listeners: no `tcp` target may share their port.
    reserved: Vec<SocketAddr>,
    /// psm ports the workers listen on now, with how many of them do: a port none holds is
    /// checked again to be free of other listeners before they share it.
    held: Mutex<HashMap<SocketAddr, usize>>,
}

impl Leases {
    /// An empty table; `reserved`: the relay's own listeners.
    pub fn new(reserved: Vec<SocketAddr>) -> Arc<Leases> {
        Arc::new(Leases {
            table: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            refusals: Mutex::new(LogLimiter::new(20, Duration::from_secs(1))),
            no_lease: Mutex::new(LogLimiter::new(20, Duration::from_secs(1))),
            reserved,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, IpAddr), Vec<Lease>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a lease of `target` for connections from `source`.
    pub fn open(
        self: &Arc<Self>,
        target: &str,
        source: IpAddr,
        session_id: &str,
        user: &str,
        bytes: Arc<SessionBytes>,
    ) -> LeaseGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(());
        let key = (target.to_string(), source.to_canonical());
        self.lock().entry(key.clone()).or_default().push(Lease {
            id,
            session_id: session_id.to_string(),
            user: user.to_string(),
            bytes,
            connections: Arc::new(AtomicU32::new(0)),
            open: Arc::new(AtomicU32::new(0)),
            end: rx,
        });
        LeaseGuard {
            leases: self.clone(),
            key,
            id,
            _end: tx,
        }
    }

    /// The newest lease of `target` from `source`.
    pub fn find(&self, target: &str, source: IpAddr) -> Option<Lease> {
        self.lock()
            .get(&(target.to_string(), source.to_canonical()))
            .and_then(|v| v.last().cloned())
    }

    /// The relay listener `addr` would share a port with, if any.
    fn collides(&self, addr: SocketAddr) -> Option<SocketAddr> {
        self.reserved.iter().copied().find(|r| {
            r.port() == addr.port()
                && (r.ip() == addr.ip() || r.ip().is_unspecified() || addr.ip().is_unspecified())
        })
    }

    /// Binds the psm port `addr` for one worker: not one of psm's own, and, where no worker
    /// holds it now, not held by another process (checked with a plain bind:
    /// `SO_REUSEPORT` would otherwise share it silently with whoever holds it). Also after a
    /// target's port was closed and served again, which another process may have taken in
    /// between.
    fn bind(self: &Arc<Self>, addr: SocketAddr) -> Result<PortHold, String> {
        if let Some(r) = self.collides(addr) {
            return Err(format!("it shares its port with psm's own listener {r}"));
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let holders = held.get(&addr).copied().unwrap_or(0);
        if holders == 0 {
            std::net::TcpListener::bind(addr).map_err(|e| e.to_string())?;
        }
        // on the worker's back end: the ring's accepts where it runs one
        let listener = crate::worker::bind(addr)
            .and_then(crate::uring::Listener::new)
            .map_err(|e| e.to_string())?;
        held.insert(addr, holders + 1);
        Ok(PortHold {
            listener: Some(listener),
            leases: self.clone(),
            addr,
        })
    }
}

/// One worker's listener on a psm port; dropped, it closes the listener and then counts the
/// port as no longer held by that worker.
struct PortHold {
    listener: Option<crate::uring::Listener>,
    leases: Arc<Leases>,
    addr: SocketAddr,
}

impl Drop for PortHold {
    fn drop(&mut self) {
        drop(self.listener.take());
        let mut held = self.leases.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.addr);
            }
        }
    }
}

/// The `tcp` target served on `listen` in the snapshot, if any.
fn target_on(
    snap: &psm_control_api::PolicySnapshot,
    listen: SocketAddr,
) -> Option<(String, String)> {
    snap.targets
        .iter()
        .find(|t| t.protocol == Protocol::Tcp && listen_of(t) == Some(listen))
        .map(|t| (t.name.clone(), t.address.clone()))
}

fn listen_of(t: &psm_control_api::Target) -> Option<SocketAddr> {
    t.listen.as_deref().and_then(|l| l.parse().ok())
}

/// Keeps this worker's psm ports in line with the policy: binds (`SO_REUSEPORT`, one socket per
/// worker) each `tcp` target's port when a snapshot names it, closes it when none does, until
/// the relay shuts down.
pub async fn serve(ctx: Arc<WorkerCtx>) {
    let mut watch = ctx.policy.watch();
    let mut shutdown = ctx.shutdown.clone();
    let mut bound: HashMap<SocketAddr, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut told: HashSet<SocketAddr> = HashSet::new();
    loop {
        let wanted: HashSet<SocketAddr> = ctx
            .policy
            .get()
            .targets
            .iter()
            .filter(|t| t.protocol == Protocol::Tcp)
            .filter_map(listen_of)
            .collect();
        bound.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                task.abort();
                info!(worker = ctx.worker, %addr, "psm port closed (no tcp target names it)");
            }
            keep
        });
        told.retain(|a| wanted.contains(a));
        for addr in wanted {
            if bound.contains_key(&addr) {
                continue;
            }
            match ctx.leases.bind(addr) {
                Ok(hold) => {
                    info!(worker = ctx.worker, %addr, "psm port open for a tcp target");
                    bound.insert(addr, tokio::spawn(accept(ctx.clone(), addr, hold)));
                }
                Err(e) => {
                    if told.insert(addr) {
                        warn!(worker = ctx.worker, %addr, error = %e, "cannot serve a tcp target's psm port");
                    }
                }
            }
        }
        tokio::select! {
            changed = watch.changed() => if changed.is_err() { break },
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
        }
    }
    for (_, task) in bound {
        task.abort();
    }
}

async fn accept(ctx: Arc<WorkerCtx>, listen: SocketAddr, mut hold: PortHold) {
    let Some(l) = hold.listener.as_mut() else {
        return;
    };
    loop {
        match l.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(connection(ctx.clone(), listen, stream, peer));
            }
            Err(e) => {
                warn!(worker = ctx.worker, %listen, error = %e, "accept failed on a psm port");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A refused pass-through connection: audited (rate-limited relay-wide), then closed.
fn refuse(
    ctx: &WorkerCtx,
    peer: SocketAddr,
    login: String,
    user: &str,
    code: &str,
    side: Side,
    reason: String,
) {
    ctx.counters.fault(side);
    let limiter = if code == "no_lease" {
        &ctx.leases.no_lease
    } else {
        &ctx.leases.refusals
    };
    let allowed = limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(Instant::now());
    if allowed.is_some() {
        info!(%peer, code, reason = %Escaped(&reason), "pass-through connection refused");
    }
    let Some(suppressed) = allowed else { return };
    let reason = if suppressed > 0 {
        format!("{reason} ({suppressed} earlier refusals not audited)")
    } else {
        reason
    };
    ctx.audit.emit(AuditKind::SessionDenied {
        protocol: psm_control_api::Protocol::Tcp,
        login,
        user: user.to_string(),
        source: peer.to_string(),
        reason,
        reason_code: code.to_string(),
        side: side.to_string(),
        client_message: String::new(),
    });
}

/// Dials a `tcp` target's `address`, for at most [`CONNECT_TIMEOUT`]; the error in words.
pub(crate) async fn dial(address: &str) -> Result<TcpStream, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// One connection on a psm port: the lease of its source address, the decision again, the
/// target dialled, both ways spliced until either side ends or the lease does.
async fn connection(
    ctx: Arc<WorkerCtx>,
    listen: SocketAddr,
    client: crate::uring::Incoming,
    peer: SocketAddr,
) {
    let snap = ctx.policy.get();
    let Some((target, address)) = target_on(&snap, listen) else {
        return; // the target went away between accept and now
    };
    let login = format!("{TCP_ACCOUNT}@{target}");
    let source = peer.ip().to_canonical();
    let Some(lease) = ctx.leases.find(&target, source) else {
        refuse(
            &ctx,
            peer,
            login,
            "",
            "no_lease",
            Side::Policy,
            format!("no lease of tcp target '{target}' is open from {source}: open one with ssh USER@{TCP_ACCOUNT}@{target}@gateway"),
        );
        return;
    };
    let attempt = Attempt {
        user: &lease.user,
        account: TCP_ACCOUNT,
        target: &target,
        source,
        now_ms: now_ms(),
    };
    if let Err(d) = decide(&snap, &attempt) {
        refuse(
            &ctx,
            peer,
            login,
            &lease.user,
            d.code(),
            Side::Policy,
            d.to_string(),
        );
        return;
    }
    drop(snap);
    // its place among the lease's connections, given back however this ends
    struct Open(Arc<AtomicU32>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _open = Open(lease.open.clone());
    if lease.open.fetch_add(1, Ordering::AcqRel) >= MAX_LEASE_CONNECTIONS {
        refuse(
            &ctx,
            peer,
            login,
            &lease.user,
            "lease_connections",
            Side::Client,
            format!("the lease already relays {MAX_LEASE_CONNECTIONS} connections"),
        );
        return;
    }
    let server = match dial(&address).await {
        Ok(s) => s,
        Err(e) => {
            let why = format!("target '{target}' unreachable at {address}: {e}");
            refuse(
                &ctx,
                peer,
                login,
                &lease.user,
                "target_unreachable",
                Side::Target,
                why,
            );
            return;
        }
    };
    if lease.end.has_changed().is_err() {
        // the lease ended while the target was dialled: nothing may pass
        return;
    }
    // both sockets on the worker's back end: their waits go through its ring where it runs one
    let (client, server) = match (
        splice::Socket::accepted(client),
        splice::Socket::dialled(server),
    ) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            refuse(
                &ctx,
                peer,
                login,
                &lease.user,
                "relay_error",
                Side::Internal,
                format!("the connection could not be put on the worker's back end: {e}"),
            );
            return;
        }
    };
    let _ = client.set_nodelay();
    let _ = server.set_nodelay();
    let number = lease.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let start = now_ms();
    info!(session = %lease.session_id, user = %lease.user, %target, %peer, number, "pass-through connection opened");
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut end = lease.end.clone();
    let mut shutdown = ctx.shutdown.clone();
    let count_up = |n: usize| {
        up.fetch_add(n as u64, Ordering::Relaxed);
        lease.bytes.input(n);
    };
    let count_down = |n: usize| {
        down.fetch_add(n as u64, Ordering::Relaxed);
        lease.bytes.output(n);
    };
    let upward = splice::one_way(&client, &server, &count_up);
    let downward = splice::one_way(&server, &client, &count_down);
    let how = tokio::select! {
        // the end of the lease and shutdown first: once either happened, no byte passes
        biased;
        _ = end.changed() => "cut: the lease ended".to_string(),
        _ = shutdown.changed() => "cut: psm shut down".to_string(),
        r = async { tokio::try_join!(upward, downward) } => match r {
            Ok(_) => "closed".to_string(),
            Err(e) => format!("ended: {e}"),
        },
    };
    drop((client, server));
    let (bytes_up, bytes_down) = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    info!(session = %lease.session_id, %target, %peer, number, bytes_up, bytes_down, how = %how, "pass-through connection ended");
    ctx.audit.emit(AuditKind::Forward {
        session_id: lease.session_id.clone(),
        user: lease.user.clone(),
        target,
        account: TCP_ACCOUNT.to_string(),
        channel: number,
        kind: "tcp".into(),
        destination: format!("{address} from {peer}"),
        source: Some(peer.to_string()),
        bytes_up,
        bytes_down,
        duration_ms: now_ms().saturating_sub(start),
    });
}
