//! The four tasks that relay one started channel: a reader and a writer per direction, joined
//! by queues whose memory [`Flow`] bounds. They record what passes ([`RecordingStream`]) and
//! count it ([`SessionBytes`](crate::control_link::SessionBytes)); the target reader also tells how the target leg ended.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use psm_recorder_format::Direction;
use russh::server::Msg;
use russh::{ChannelMsg, ChannelWriteHalf, Sig};
use tokio::sync::mpsc;

use crate::commands::Gate;
use crate::end::{EndReason, TargetLoss};
use crate::flow::Flow;
use crate::recording::RecordingStream;
use crate::session::tap::Tap;
use crate::session::Shared;
use crate::upstream::LossWatch;

/// What travels from a reader task to its writer task.
pub(crate) enum Item {
    Data(Bytes),
    Ext(u32, Bytes),
    Eof,
    ExitStatus(u32),
    ExitSignal {
        signal: Sig,
        core_dumped: bool,
        message: String,
    },
    Close,
}

/// What an item costs in a queue besides its bytes: every item counts against the bound, so a
/// flood of empty messages cannot grow memory either.
const ITEM_OVERHEAD: usize = 64;
/// Longest exit-signal message relayed (a target may send megabytes).
pub(crate) const MAX_SIGNAL_MESSAGE: usize = 1024;
/// Longest custom signal name kept.
pub(crate) const MAX_SIGNAL_NAME: usize = 32;

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Data(b) | Item::Ext(_, b) => b.len(),
            _ => 0,
        }
    }

    /// What the item costs in a queue.
    pub(crate) fn cost(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Item::Data(b) | Item::Ext(_, b) => b.len(),
                Item::ExitSignal { message, .. } => message.len(),
                _ => 0,
            }
    }

    fn is_exit(&self) -> bool {
        matches!(self, Item::ExitStatus(_) | Item::ExitSignal { .. })
    }
}

fn cut(s: &str, max: usize) -> String {
    psm_control_api::escape::truncate(s, max).0.to_string()
}

/// What the target's message `m` is for the user's channel; None for one psm does not relay,
/// and for an empty data message, which carries nothing (a target can send them without end:
/// they take no window, so relaying and recording each would cost psm for no byte).
pub(crate) fn down_item(m: ChannelMsg) -> Option<Item> {
    Some(match m {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } if data.is_empty() => {
            return None
        }
        ChannelMsg::Data { data } => Item::Data(data),
        ChannelMsg::ExtendedData { data, ext } => Item::Ext(ext, data),
        ChannelMsg::Eof => Item::Eof,
        ChannelMsg::ExitStatus { exit_status } => Item::ExitStatus(exit_status),
        ChannelMsg::ExitSignal {
            signal_name,
            core_dumped,
            error_message,
            ..
        } => Item::ExitSignal {
            signal: match signal_name {
                Sig::Custom(name) => Sig::Custom(cut(&name, MAX_SIGNAL_NAME)),
                other => other,
            },
            core_dumped,
            message: cut(&error_message, MAX_SIGNAL_MESSAGE),
        },
        ChannelMsg::Close => Item::Close,
        _ => return None,
    })
}

/// Records what goes to the user; `false` when the recording is lost and it must not go.
#[must_use = "bytes whose recording failed must not be relayed"]
pub(crate) async fn record_down(rec: Option<&RecordingStream>, ch: u32, item: &Item) -> bool {
    let Some(rec) = rec else { return true };
    match item {
        Item::Data(d) => rec.data(ch, Direction::Output, d.clone()).await,
        Item::Ext(_, d) => rec.data(ch, Direction::Error, d.clone()).await,
        _ => true,
    }
}

/// `session`: the channel is a session channel, whose close is the session's end reason (a
/// forward's close is only that forward's: its own `forward` event says so).
pub(crate) fn account_down(shared: &Shared, flow: &Flow, item: &Item, session: bool) {
    match item {
        Item::Data(_) | Item::Ext(..) => {
            shared.bytes.output(item.len());
            flow.count_down(item.len());
        }
        Item::ExitStatus(s) => shared.with(|st| st.exit_status = Some(*s)),
        Item::ExitSignal { signal, .. } => {
            let name = sig_name(signal);
            shared.with(|st| st.exit_signal = Some(name));
        }
        Item::Close if session => shared.ended(EndReason::TargetEnded),
        Item::Close => {}
        Item::Eof => {}
    }
    flow.down_queued(item.cost());
}

pub(crate) fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(c) => c.clone(),
    }
}

/// Queues `data` toward the target, recorded as input.
async fn send_up(
    tx: &mpsc::UnboundedSender<Item>,
    flow: &Flow,
    rec: Option<&RecordingStream>,
    ch: u32,
    data: Bytes,
) -> bool {
    if data.is_empty() {
        return true;
    }
    if let Some(rec) = rec {
        if !rec.data(ch, Direction::Input, data.clone()).await {
            return false;
        }
    }
    flow.up_queued(data.len());
    flow.count_up(data.len());
    tx.send(Item::Data(data)).is_ok()
}

/// Queues a line from psm toward the user (recorded as output, as the user saw it).
async fn tell_user(
    down: &mpsc::UnboundedSender<Item>,
    flow: &Flow,
    rec: Option<&RecordingStream>,
    ch: u32,
    text: String,
    stderr: bool,
) {
    if flow.down_full() {
        // a user who reads nothing is told nothing more: this reader must keep draining the
        // channel (it cannot wait on the download queue), so psm's own lines are what gives
        return;
    }
    let data = Bytes::from(text);
    let item = if stderr {
        Item::Ext(1, data)
    } else {
        Item::Data(data)
    };
    if record_down(rec, ch, &item).await {
        flow.down_queued(item.cost());
        let _ = down.send(item);
    }
}

/// User input on a shell under command control: forwards what is not a submitted line at
/// once, and decides each line (Enter on a terminal, newline without one) before it goes.
/// Returns false when the session is to end.
#[allow(clippy::too_many_arguments)]
async fn gated_input(
    gate: &Gate,
    down: &mpsc::UnboundedSender<Item>,
    data: Bytes,
    tx: &mpsc::UnboundedSender<Item>,
    flow: &Flow,
    shared: &Shared,
    rec: Option<&RecordingStream>,
    ch: u32,
) -> bool {
    use psm_control_api::CommandAction;
    if !gate.has_screen() {
        for (line, complete) in gate.stdin_lines(&data) {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']).trim();
            if !complete || text.is_empty() {
                if !complete {
                    shared.notices.note("unchecked long input line", "", || {
                        format!("an input line longer than {} bytes on channel {ch} was forwarded unchecked", crate::commands::MAX_STDIN_LINE)
                    });
                }
                if !send_up(tx, flow, rec, ch, Bytes::from(line)).await {
                    return false;
                }
                continue;
            }
            let v = shared.decide_command(ch, text, "stdin").await;
            match v.action {
                CommandAction::Allow | CommandAction::Alert => {
                    if !send_up(tx, flow, rec, ch, Bytes::from(line)).await {
                        return false;
                    }
                }
                CommandAction::Deny => {
                    let shown = crate::escape_short(text);
                    tell_user(
                        down,
                        flow,
                        rec,
                        ch,
                        format!("psm: command denied by policy: {shown}\n"),
                        true,
                    )
                    .await;
                }
                CommandAction::Terminate => {
                    shared.stop(EndReason::Policy(
                        psm_control_api::PolicyStop::CommandTerminated {
                            line: text.to_string(),
                            rule: v.rule,
                        },
                    ));
                    return false;
                }
            }
        }
        return true;
    }
    let mut rest = data;
    while !rest.is_empty() {
        let Some(i) = rest.iter().position(|b| *b == b'\r' || *b == b'\n') else {
            gate.typing();
            return send_up(tx, flow, rec, ch, rest).await;
        };
        if i > 0 {
            gate.typing();
            if !send_up(tx, flow, rec, ch, rest.slice(..i)).await {
                return false;
            }
        }
        let enter = rest.slice(i..i + 1);
        rest = rest.slice(i + 1..);
        // the Enter waits for the echo of what came before it
        gate.settle().await;
        let line = gate.screen_line();
        let Some(line) = line.filter(|l| !l.is_empty()) else {
            gate.line_done();
            if !send_up(tx, flow, rec, ch, enter).await {
                return false;
            }
            continue;
        };
        let v = shared.decide_command(ch, &line, "shell").await;
        gate.line_done();
        match v.action {
            CommandAction::Allow | CommandAction::Alert => {
                if !send_up(tx, flow, rec, ch, enter).await {
                    return false;
                }
            }
            CommandAction::Deny => {
                // the line never runs: cleared on the target, a fresh prompt, and the reason
                let shown = crate::escape_short(&line);
                tell_user(
                    down,
                    flow,
                    rec,
                    ch,
                    format!("\r\npsm: command denied by policy: {shown}\r\n"),
                    false,
                )
                .await;
                if !send_up(
                    tx,
                    flow,
                    rec,
                    ch,
                    Bytes::from_static(crate::commands::CLEAR_LINE),
                )
                .await
                {
                    return false;
                }
            }
            CommandAction::Terminate => {
                shared.stop(EndReason::Policy(
                    psm_control_api::PolicyStop::CommandTerminated { line, rule: v.rule },
                ));
                return false;
            }
        }
    }
    true
}

/// User -> relay: drains the user's channel into the up queue, recording input. A shell's
/// input goes through its command gate; the tap, if any, sees the data first.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn read_client(
    mut r: russh::ChannelReadHalf,
    tx: mpsc::UnboundedSender<Item>,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
    rec: Option<RecordingStream>,
    ch: u32,
    gate: Option<(Arc<Gate>, mpsc::UnboundedSender<Item>)>,
    tap: Option<Arc<Tap>>,
    session: bool,
) {
    // The up queue is bounded by its bytes: a message that carries none (empty data, an EOF
    // repeated) is not queued, or a flood of them would grow it without a bound.
    let mut eof = false;
    loop {
        // Only a user who multiplexes channels and keeps one of them congested can get here;
        // the window hook keeps a single channel far below this.
        tokio::select! {
            _ = flow.up_ready() => {}
            _ = tx.closed() => return,
        }
        let item = match r.wait().await {
            Some(ChannelMsg::Data { data }) if data.is_empty() => continue,
            Some(ChannelMsg::Eof) if eof => continue,
            Some(ChannelMsg::Data { data }) => {
                shared.bytes.input(data.len());
                if let Some(t) = &tap {
                    t.up(&shared, &data);
                }
                if let Some((g, down)) = &gate {
                    if !gated_input(g, down, data, &tx, &flow, &shared, rec.as_ref(), ch).await {
                        return;
                    }
                    continue;
                }
                if let Some(rec) = &rec {
                    if !rec.data(ch, Direction::Input, data.clone()).await {
                        return;
                    }
                }
                flow.up_queued(data.len());
                flow.count_up(data.len());
                Item::Data(data)
            }
            Some(ChannelMsg::Eof) => {
                eof = true;
                if let Some((g, down)) = &gate {
                    // a last line without its newline is decided too
                    let rest = g.stdin_rest();
                    if !rest.is_empty() {
                        let mut line = rest;
                        line.push(b'\n');
                        if !gated_input(
                            g,
                            down,
                            Bytes::from(line),
                            &tx,
                            &flow,
                            &shared,
                            rec.as_ref(),
                            ch,
                        )
                        .await
                        {
                            return;
                        }
                    }
                }
                Item::Eof
            }
            Some(ChannelMsg::Close) | None => {
                if session {
                    shared.ended(EndReason::ClientClosed);
                }
                let _ = tx.send(Item::Close);
                flow.user_closed();
                return;
            }
            // Requests are handled by the handler callbacks; nothing else matters here.
            Some(_) => continue,
        };
        if tx.send(item).is_err() {
            return;
        }
    }
}

/// Relay -> target: writes the up queue to the target channel (waiting on its window).
pub(crate) async fn write_target(
    mut rx: mpsc::UnboundedReceiver<Item>,
    w: Arc<ChannelWriteHalf<russh::client::Msg>>,
    flow: Arc<Flow>,
) {
    while let Some(item) = rx.recv().await {
        let n = item.len();
        let r = match item {
            Item::Data(d) => w.data_bytes(d).await,
            Item::Eof => w.eof().await,
            Item::Close => {
                let _ = w.close().await;
                return;
            }
            _ => Ok(()),
        };
        flow.up_written(n);
        if r.is_err() {
            return;
        }
    }
}

/// Bytes one read from a `tcp` target's connection takes at most.
const TCP_READ: usize = 64 * 1024;

/// Relay -> a `tcp` target's connection (a local forward on its login): writes the up queue
/// to the socket; the user's EOF shuts its sending side, the close ends it. `done` is set once
/// nothing more goes to the target (the EOF sent, the close, or the socket failed).
pub(crate) async fn write_tcp(
    mut rx: mpsc::UnboundedReceiver<Item>,
    mut w: tokio::io::WriteHalf<crate::uring::Leg>,
    flow: Arc<Flow>,
    done: tokio::sync::watch::Sender<bool>,
) {
    use tokio::io::AsyncWriteExt as _;
    while let Some(item) = rx.recv().await {
        let n = item.len();
        let (r, last) = match item {
            // (flushed: on io_uring what the socket had no room for waits in the leg's own
            // buffer until a flush sends it on)
            Item::Data(d) => (
                async {
                    w.write_all(&d).await?;
                    w.flush().await
                }
                .await,
                false,
            ),
            Item::Eof => (w.shutdown().await, true),
            Item::Close => break,
            _ => (Ok(()), false),
        };
        flow.up_written(n);
        if r.is_err() || last {
            break;
        }
    }
    done.send_replace(true);
    // what the user still sends is dropped, and this waits for the channel's end: the write
    // half stays open until then (dropping it would shut the socket's sending side down where
    // the user sent no EOF), and the user's side goes on being read, so its close is seen
    while let Some(item) = rx.recv().await {
        flow.up_written(item.len());
    }
}

/// A `tcp` target's connection -> relay: its bytes into the down queue, recorded as output
/// like any channel's. The target's end of stream is the channel's EOF, and the channel closes
/// once the user's side is done too (`up_done`: a target that half-closes still gets what the
/// user sends, as over OpenSSH's own forwards); a reset closes it at once.
pub(crate) async fn read_tcp(
    mut r: tokio::io::ReadHalf<crate::uring::Leg>,
    tx: mpsc::UnboundedSender<Item>,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
    rec: Option<RecordingStream>,
    ch: u32,
    mut up_done: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::AsyncReadExt as _;
    let user_closed = flow.until_user_closed();
    tokio::pin!(user_closed);
    let mut buf = bytes::BytesMut::new();
    loop {
        tokio::select! {
            _ = flow.down_ready() => {}
            _ = tx.closed() => return,
        }
        if buf.capacity() < TCP_READ / 4 {
            buf = bytes::BytesMut::with_capacity(TCP_READ);
        }
        let read = tokio::select! {
            r = r.read_buf(&mut buf) => r,
            () = &mut user_closed => {
                let _ = tx.send(Item::Close);
                return;
            }
        };
        let item = match read {
            Ok(0) => Item::Eof,
            Ok(_) => Item::Data(buf.split().freeze()),
            Err(_) => Item::Close,
        };
        let end = !matches!(item, Item::Data(_));
        if !record_down(rec.as_ref(), ch, &item).await {
            return;
        }
        account_down(&shared, &flow, &item, false);
        if tx.send(item).is_err() {
            return;
        }
        if end {
            break;
        }
    }
    // the target sent its EOF (or reset): the channel closes once the user's side is done
    tokio::select! {
        _ = up_done.wait_for(|d| *d) => {}
        () = &mut user_closed => {}
        _ = tx.closed() => return,
    }
    flow.down_queued(Item::Close.cost());
    let _ = tx.send(Item::Close);
}

/// How long the target reader waits for russh to say how a connection that vanished was lost.
const LOSS_WAIT: Duration = Duration::from_secs(2);

/// Why the target leg vanished without closing its channel, once russh says.
async fn target_loss(loss: &mut LossWatch) -> EndReason {
    let seen = tokio::time::timeout(LOSS_WAIT, loss.wait_for(|l| l.is_some())).await;
    match seen {
        Ok(Ok(l)) => l.clone().map(EndReason::from),
        _ => None,
    }
    .unwrap_or_else(|| EndReason::from(TargetLoss::Closed(String::new())))
}

/// Target -> relay: drains the target channel into the down queue, recording output. When the
/// target connection vanishes without closing a session channel, the user is told why in one
/// line (a forwarded channel, which carries only bytes, is just closed).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn read_target(
    mut r: russh::ChannelReadHalf,
    tx: mpsc::UnboundedSender<Item>,
    flow: Arc<Flow>,
    shared: Arc<Shared>,
    rec: Option<RecordingStream>,
    ch: u32,
    mut loss: LossWatch,
    gate: Option<Arc<Gate>>,
    session: bool,
    tap: Option<Arc<Tap>>,
) {
    let mut exited = false;
    // one wait for the whole channel, not one registration per packet
    let user_closed = flow.until_user_closed();
    tokio::pin!(user_closed);
    loop {
        tokio::select! {
            _ = flow.down_ready() => {}
            // The user side is gone: nothing will drain the queue any more.
            _ = tx.closed() => return,
        }
        let next = tokio::select! {
            m = r.wait() => m,
            () = &mut user_closed => {
                // the user closed the channel: its writer closes and ends, and so does this
                let _ = tx.send(Item::Close);
                return;
            }
        };
        let Some(msg) = next else {
            let mut last = Vec::with_capacity(2);
            if session {
                let why = target_loss(&mut loss).await;
                if let Some(line) = why.user_line() {
                    last.push(Item::Ext(1, Bytes::from(format!("{line}\r\n"))));
                }
                shared.ended(why);
            }
            last.push(Item::Close);
            for item in last {
                flow.down_queued(item.cost());
                let _ = tx.send(item);
            }
            return;
        };
        let Some(item) = down_item(msg) else { continue };
        if item.is_exit() {
            // Only the first exit status or signal means anything; a target that sends more is
            // noted, and they are dropped.
            if exited {
                shared.notices.note("repeated exit status from the target", "", || {
                    format!("target sent more than one exit status or signal on channel {ch}; the repeats were dropped")
                });
                continue;
            }
            exited = true;
        }
        if let (Some(g), Item::Data(d)) = (&gate, &item) {
            g.output(d);
        }
        if let Some(t) = &tap {
            t.down(&shared, &item);
        }
        if !record_down(rec.as_ref(), ch, &item).await {
            // the recording is lost: nothing more reaches the user, the session is ending
            return;
        }
        account_down(&shared, &flow, &item, session);
        let close = matches!(item, Item::Close);
        if tx.send(item).is_err() || close {
            return;
        }
    }
}

/// How long the target's EOF is held back from the user while psm waits for the exit status.
///
/// sshd sends EOF and then the exit status. A client that has sent its own EOF closes the
/// channel as soon as it sees the target's (OpenSSH's ControlMaster does), and russh answers a
/// close at once: an exit status arriving after that could no longer be delivered. Holding the
/// EOF until the exit status (or the close) arrives, for at most this long, keeps the order
/// data, exit status, EOF, close that every client handles.
pub(crate) const EOF_HOLD: Duration = Duration::from_millis(250);

/// Relay -> user: writes the down queue to the user's channel (waiting on its window), with
/// exit status / signal and close in order after the data.
pub(crate) async fn write_client(
    mut rx: mpsc::UnboundedReceiver<Item>,
    w: ChannelWriteHalf<Msg>,
    handle: russh::server::Handle,
    flow: Arc<Flow>,
) {
    let mut eof_held = false;
    // after the EOF the channel carries no more data (OpenSSH disconnects on it)
    let mut eof_sent = false;
    loop {
        let next = if eof_held {
            match tokio::time::timeout(EOF_HOLD, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    eof_held = false;
                    eof_sent = true;
                    if w.eof().await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(item) = next else {
            if eof_held {
                let _ = w.eof().await;
            }
            return;
        };
        let n = item.cost();
        let exit = item.is_exit();
        if eof_held && !exit {
            // anything but the exit status releases the EOF first, in the target's order
            eof_held = false;
            eof_sent = true;
            if w.eof().await.is_err() {
                return;
            }
        }
        let r = match item {
            // nothing after the EOF but the exit status and the close: the rest is dropped
            Item::Data(_) | Item::Ext(..) | Item::Eof if eof_sent || eof_held => Ok(()),
            Item::Data(d) => w.data_bytes(d).await,
            Item::Ext(ext, d) => w.extended_data_bytes(ext, d).await,
            Item::Eof => {
                eof_held = true;
                Ok(())
            }
            Item::ExitStatus(s) => w.exit_status(s).await,
            Item::ExitSignal {
                signal,
                core_dumped,
                message,
            } => handle
                .exit_signal_request(w.id(), signal, core_dumped, message, "en".into())
                .await
                .map_err(|_| russh::Error::SendError),
            Item::Close => {
                let _ = w.close().await;
                return;
            }
        };
        flow.down_written(n);
        if r.is_err() {
            return;
        }
        if exit && eof_held {
            eof_held = false;
            eof_sent = true;
            if w.eof().await.is_err() {
                return;
            }
        }
    }
}
