//! A user channel between its opening and the shell/exec/subsystem request that starts it.
//!
//! russh hands every message of a channel (data, and a copy of each request) to the channel's
//! bounded queue and waits when it is full; nobody reads a channel that has not started, so a
//! client that sends 100 messages before `exec` would wedge the whole connection. [`PreStart`]
//! reads the channel from the moment it opens: it keeps the data (bounded) for the target and
//! drops the request copies (the handler callbacks deal with requests). When the channel starts,
//! [`PreStart::finish`] hands back the channel and what it kept.

use bytes::Bytes;
use russh::{ChannelMsg, ChannelReadHalf};
use tokio::sync::oneshot;

/// Bytes a client may send on a channel before it starts (more than one window is a protocol
/// violation anyway).
pub const MAX_PRESTART_DATA: usize = 4 << 20;
/// What a kept data message counts toward [`MAX_PRESTART_DATA`] at least: an empty one still
/// holds its place in the list, so a flood of them is bounded too.
const EARLY_ITEM_COST: usize = 64;
/// Requests a client may send on a channel before it starts (env, pty-req, window-change,
/// signal, …). OpenSSH sends a handful.
pub const MAX_PRESTART_REQUESTS: u32 = 64;

/// What arrived before the start, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Early {
    /// Data for the target.
    Data(Bytes),
    /// The client sent EOF.
    Eof,
    /// The client closed the channel (or the connection went away).
    Closed,
}

/// The reader of a channel that has not started yet.
pub struct PreStart {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(ChannelReadHalf, Vec<Early>)>,
}

impl PreStart {
    /// Starts reading `r`; `too_much` is called (once) when the client sends more than
    /// [`MAX_PRESTART_DATA`] before the start.
    pub fn spawn(mut r: ChannelReadHalf, too_much: impl FnOnce(usize) + Send + 'static) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut bytes = 0usize;
            let mut too_much = Some(too_much);
            let mut eof = false;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return (r, kept),
                    m = r.wait() => match m {
                        Some(ChannelMsg::Data { data }) => {
                            // an empty message still costs its place in the list
                            bytes += data.len().max(EARLY_ITEM_COST);
                            if bytes > MAX_PRESTART_DATA {
                                if let Some(f) = too_much.take() {
                                    f(bytes);
                                }
                            } else {
                                kept.push(Early::Data(data));
                            }
                        }
                        // one EOF is all a channel can say: repeats are not kept
                        Some(ChannelMsg::Eof) => {
                            if !eof {
                                eof = true;
                                kept.push(Early::Eof);
                            }
                        }
                        Some(ChannelMsg::Close) | None => {
                            kept.push(Early::Closed);
                            let _ = (&mut stopped).await;
                            return (r, kept);
                        }
                        // request copies: the handler callbacks answer and count them
                        Some(_) => {}
                    },
                }
            }
        });
        PreStart { stop, task }
    }

    /// Stops reading and returns the channel with what arrived before the start.
    pub async fn finish(self) -> Option<(ChannelReadHalf, Vec<Early>)> {
        let _ = self.stop.send(());
        self.task.await.ok()
    }
}
