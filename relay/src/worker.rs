//! Worker threads: one per core, each with its own current-thread runtime and its own
//! `SO_REUSEPORT` listener, whose connections come through the worker's io_uring where it runs
//! one (`uring::Listener`). A connection, both of its legs and its recording queue stay on the
//! worker that accepted it.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{error, info, warn};

use crate::rdp::tls::GatewayCert;
use crate::session::{handle_connection, WorkerCtx};
use crate::uring::{Incoming, Listener};

/// Which runtime drives a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoBackend {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring; fail if unavailable.
    Uring,
    /// Plain tokio current-thread runtime (epoll).
    Epoll,
}

/// Binds one listening socket with `SO_REUSEPORT` (each worker gets its own).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// The CPUs this process may run on (its affinity mask, which cgroups and `taskset` narrow), in
/// order; empty when the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread (worker `index`) to one of `cpus`, round robin, so that a worker's
/// sessions keep their caches; returns the CPU, or `None` when pinning failed.
pub fn pin_current_thread(index: usize, cpus: &[usize]) -> Option<usize> {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    if cpus.is_empty() {
        return None;
    }
    let cpu = cpus[index % cpus.len()];
    let mut set = CpuSet::new();
    set.set(cpu).ok()?;
    sched_setaffinity(Pid::from_raw(0), &set).ok()?;
    Some(cpu)
}

/// The RDP listener of a worker, with the certificate it serves.
pub struct RdpListener {
    /// This worker's `SO_REUSEPORT` socket.
    pub listener: std::net::TcpListener,
    /// psm's certificate toward users.
    pub cert: Arc<GatewayCert>,
}

/// Runs one worker on the current thread until its listener fails. `rdp`: the worker's RDP
/// listener, served by the same runtime.
pub fn run_worker(
    index: usize,
    listener: std::net::TcpListener,
    rdp: Option<RdpListener>,
    ctx: Arc<WorkerCtx>,
    backend: IoBackend,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // receives armed again wait in the ring's queue for a send to take them along; what
        // none took goes into the kernel before the thread sleeps
        .on_thread_park(crate::uring::before_park)
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        if backend != IoBackend::Epoll {
            // the ring registers with this runtime's reactor: made inside it
            match crate::uring::Ring::new() {
                Ok(ring) => {
                    crate::uring::install(ring.clone());
                    // a session's sockets live in the ring's table, not among the process's
                    // descriptors, up to this many per worker
                    info!(
                        worker = index,
                        registered_sockets = ring.slots(),
                        "worker running on io_uring"
                    );
                    // a task of the runtime, not of the `LocalSet`: waking a `LocalSet` task
                    // wakes the `block_on` future, which costs the thread one more
                    // `epoll_wait` before it parks (the driver is woken for each receive
                    // `start_lazy` queues: about two per echo, perf/BENCHMARKS.md)
                    tokio::spawn(ring.drive());
                }
                Err(e) if backend == IoBackend::Uring => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("io_uring unavailable ({e}), and --io uring allows no fallback"),
                    ))
                }
                Err(e) => {
                    warn!(worker = index, error = %e, "io_uring unavailable; worker falls back to epoll")
                }
            }
        }
        if crate::uring::current().is_none() {
            info!(worker = index, "worker running on tokio (epoll)");
        }
        accept_loop(index, listener, rdp, ctx).await
    })
}

async fn accept_loop(
    index: usize,
    listener: std::net::TcpListener,
    rdp: Option<RdpListener>,
    ctx: Arc<WorkerCtx>,
) -> std::io::Result<()> {
    // on io_uring the listeners' accepts go through the ring too
    let mut listener = Listener::new(listener)?;
    let mut rdp = match rdp {
        Some(r) => Some((Listener::new(r.listener)?, r.cert)),
        None => None,
    };
    // the psm ports of tcp targets follow the policy on their own
    tokio::spawn(crate::passthrough::serve(ctx.clone()));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(handle_connection(ctx.clone(), stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: log and keep serving the connections we have.
                    error!(worker = index, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            (accepted, cert) = accept_rdp(&mut rdp) => {
                match accepted {
                    Ok((stream, peer)) => {
                        tokio::task::spawn_local(crate::rdp::handle_rdp_connection(
                            ctx.clone(),
                            cert,
                            stream,
                            peer,
                        ));
                    }
                    Err(e) => {
                        error!(worker = index, error = %e, "rdp accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }
}

/// The next connection on the RDP listener (never, without one). Cancel-safe, as
/// [`Listener::accept`] is.
async fn accept_rdp(
    rdp: &mut Option<(Listener, Arc<GatewayCert>)>,
) -> (std::io::Result<(Incoming, SocketAddr)>, Arc<GatewayCert>) {
    match rdp {
        Some((l, cert)) => (l.accept().await, cert.clone()),
        None => std::future::pending().await,
    }
}
