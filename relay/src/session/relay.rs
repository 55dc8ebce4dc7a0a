//! Relaying one channel between the two legs: the four tasks of `pipe` joined by a [`Flow`],
//! what arrived before the start replayed first, and the channel's end (its `forward` audit
//! event, its dedicated target connection closed, the handler told to forget it). Used for the
//! channels the user opens and for those psm opens toward the user (remote forwards, the agent);
//! the target's side is a channel on its SSH connection, or a `tcp` target's own TCP connection
//! (a local forward on its login, `session::tcp_forward`).

use super::*;
use futures_util::FutureExt;
use std::future::Future;
use std::pin::Pin;

/// A channel ready to relay.
pub(super) struct Relaying {
    /// The user-side channel.
    pub(super) channel: ChannelId,
    pub(super) handle: russh::server::Handle,
    pub(super) down_r: russh::ChannelReadHalf,
    pub(super) down_w: ChannelWriteHalf<Msg>,
    /// What the user sent before the start.
    pub(super) before: Vec<Early>,
    /// The target's side.
    pub(super) up: Up,
    /// Command control of a shell.
    pub(super) gate: Option<Arc<crate::commands::Gate>>,
    /// A forward: audited as one `forward` event when it ends.
    pub(super) forward: Option<(ForwardKind, String)>,
    /// The channel's own target connection, closed when it ends (None: a shared one).
    pub(super) dedicated: Option<Arc<TargetHandle>>,
    /// What is read from the channel's bytes besides relaying them (file transfers, an exec's
    /// end).
    pub(super) tap: Option<Arc<tap::Tap>>,
}

/// The target's side of a relayed channel.
pub(super) enum Up {
    /// A channel on the target's SSH connection.
    Channel {
        up: Channel<russh::client::Msg>,
        /// What the target sent while psm waited for its answer to a request.
        early: Vec<ChannelMsg>,
        loss: LossWatch,
    },
    /// A `tcp` target's own connection (on the worker's back end), which the channel's end
    /// closes.
    Tcp(crate::uring::Leg),
}

/// Starts relaying; returns the target channel's write half (for window changes and signals),
/// None for a `tcp` target's connection.
pub(super) async fn spawn(
    shared: &Arc<Shared>,
    r: Relaying,
) -> Option<Arc<ChannelWriteHalf<russh::client::Msg>>> {
    let Relaying {
        channel,
        handle,
        down_r,
        down_w,
        before,
        up,
        gate,
        forward,
        dedicated,
        tap,
    } = r;
    // a channel psm opened toward the user (a remote forward's connection, the agent) has
    // neither a target connection of its own nor a `tcp` target's
    let reverse = dedicated.is_none() && matches!(up, Up::Channel { .. });
    let (early, up) = match up {
        Up::Channel { up, early, loss } => (
            early,
            Up::Channel {
                up,
                early: Vec::new(),
                loss,
            },
        ),
        tcp @ Up::Tcp(_) => (Vec::new(), tcp),
    };
    let flow = Flow::counted(shared.bytes.worker().clone());
    let rec = shared.recording();
    let ch: u32 = channel.into();
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    for m in early {
        if let Some(item) = down_item(m) {
            if let (Some(g), crate::pipe::Item::Data(d)) = (&gate, &item) {
                g.output(d);
            }
            if let Some(t) = &tap {
                t.down(shared, &item);
            }
            if !record_down(rec.as_ref(), ch, &item).await {
                continue;
            }
            account_down(shared, &flow, &item, forward.is_none());
            let _ = down_tx.send(item);
        }
    }
    // what the user sent before the start goes first, recorded and counted like the rest
    for e in before {
        let item = match e {
            Early::Data(data) => {
                shared.bytes.input(data.len());
                if let Some(t) = &tap {
                    t.up(shared, &data);
                }
                if let Some(rec) = &rec {
                    if !rec
                        .data(ch, psm_recorder_format::Direction::Input, data.clone())
                        .await
                    {
                        continue;
                    }
                }
                flow.up_queued(data.len());
                crate::pipe::Item::Data(data)
            }
            Early::Eof => crate::pipe::Item::Eof,
            Early::Closed => crate::pipe::Item::Close,
        };
        let _ = up_tx.send(item);
    }
    shared.windows(|w| w.flows.insert(channel, flow.clone()));
    tokio::spawn(until_over(
        shared,
        read_client(
            down_r,
            up_tx,
            flow.clone(),
            shared.clone(),
            rec.clone(),
            ch,
            gate.clone().map(|g| (g, down_tx.clone())),
            tap.clone(),
            forward.is_none(),
        ),
    ));
    let up_w = match up {
        Up::Channel { up, loss, .. } => {
            let (up_r, up_w) = up.split();
            let up_w = Arc::new(up_w);
            tokio::spawn(until_over(
                shared,
                write_target(up_rx, up_w.clone(), flow.clone()),
            ));
            tokio::spawn(until_over(
                shared,
                read_target(
                    up_r,
                    down_tx,
                    flow.clone(),
                    shared.clone(),
                    rec,
                    ch,
                    loss,
                    gate,
                    forward.is_none(),
                    tap.clone(),
                ),
            ));
            Some(up_w)
        }
        Up::Tcp(leg) => {
            let (tcp_r, tcp_w) = tokio::io::split(leg);
            let (up_done, up_done_rx) = watch::channel(false);
            tokio::spawn(until_over(
                shared,
                crate::pipe::write_tcp(up_rx, tcp_w, flow.clone(), up_done),
            ));
            tokio::spawn(until_over(
                shared,
                crate::pipe::read_tcp(
                    tcp_r,
                    down_tx,
                    flow.clone(),
                    shared.clone(),
                    rec,
                    ch,
                    up_done_rx,
                ),
            ));
            None
        }
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        let flow = flow.clone();
        let sid = shared.session_id.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if Arc::strong_count(&flow) <= 1 {
                    return;
                }
                debug!(session = %sid, state = %flow.describe(), "flow");
            }
        });
    }
    // a channel the user opened gets the end-of-session line on its stderr
    if !reverse {
        shared.with(|s| s.running.push(channel));
    }
    let relaying = until_over(shared, write_client(down_rx, down_w, handle, flow.clone()));
    let shared = shared.clone();
    let opened_ms = now_ms();
    // `then`, not an `async` block that awaits `relaying`: such a block would keep room for
    // the relaying future twice (see `UntilOver`)
    tokio::spawn(relaying.then(move |()| async move {
        if let Some(t) = tap {
            t.end(&shared, &flow);
        }
        if let Some((kind, destination)) = forward {
            // one audit event per forward, with what it moved
            let end_ms = now_ms().max(opened_ms);
            let (user, target, account) = shared.who().unwrap_or_default();
            shared.audit.emit(AuditKind::Forward {
                session_id: shared.session_id.clone(),
                user,
                target,
                account,
                channel: ch,
                kind: kind.as_str().to_string(),
                destination,
                source: None,
                bytes_up: flow.moved_up(),
                bytes_down: flow.moved_down(),
                duration_ms: end_ms - opened_ms,
            });
        }
        // The channel is over: its dedicated target connection goes with it, and the handler
        // forgets it (russh does not tell it when the target closed the channel).
        if let Some(target) = dedicated {
            disconnect_target(&target).await;
        }
        if reverse {
            shared.reverse_open.fetch_sub(1, Ordering::AcqRel);
        }
        if let Ok(mut f) = shared.finished.lock() {
            f.push(channel);
        }
        shared.with(|s| s.running.retain(|c| *c != channel));
    }));
    up_w
}

/// Runs `task` until it ends or the session is over, whichever comes first.
fn until_over<F: Future<Output = ()>>(shared: &Shared, task: F) -> UntilOver<F> {
    let mut over = shared.over.subscribe();
    UntilOver {
        task,
        // (an error: the session's state is gone, which is over too)
        over: Box::pin(async move {
            let _ = over.wait_for(|o| *o).await;
        }),
    }
}

pin_project_lite::pin_project! {
    /// [`until_over`]'s future. A struct, not an `async` block around `task`: a block that
    /// captures a future and then awaits it keeps room for it twice (where it was captured and
    /// where it is awaited), about 7 KiB of every idle session (perf/BENCHMARKS.md).
    struct UntilOver<F> {
        #[pin]
        task: F,
        over: Pin<Box<dyn Future<Output = ()> + Send>>,
    }
}

impl<F: Future<Output = ()>> Future for UntilOver<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.project();
        if this.task.poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        this.over.as_mut().poll(cx)
    }
}
