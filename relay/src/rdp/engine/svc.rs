//! Message boundaries on a filtered static channel: chunks are relayed as they come, and each
//! message is judged once from its first bytes (without holding the whole message), or collected
//! whole when it must be rewritten.

use super::channels::Chunk;

/// Most bytes psm holds for one message it collects or judges (then the sender is at fault).
pub(super) const MAX_MESSAGE: usize = 1024 * 1024;
/// Most chunks held while too few bytes are known to judge a message.
const MAX_HELD: usize = 64;

/// What to do with a message, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Relay its chunks unchanged.
    Pass,
    /// Drop its chunks.
    Drop,
    /// Collect it whole (at most [`MAX_MESSAGE`] bytes) and hand it over at its last chunk.
    Collect,
}

/// What became of one chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Relay this original frame.
    Forward(Vec<u8>),
    /// A collected message is complete.
    Message(Vec<u8>),
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    /// Too few bytes known to judge: the chunks so far are held.
    Judging {
        data: Vec<u8>,
        held: Vec<Vec<u8>>,
    },
    Passing,
    Dropping,
    Collecting(Vec<u8>),
}

/// The message state of one channel in one direction.
#[derive(Debug, Default)]
pub(super) struct Messages {
    state: State,
}

impl Messages {
    /// Feeds one chunk (`frame` is the whole MCS frame that carried it). `need` bytes of the
    /// message's start (or all of it, when its last chunk comes first) are gathered before
    /// `decide` is called, once per message.
    pub fn feed(
        &mut self,
        frame: &[u8],
        chunk: &Chunk<'_>,
        need: usize,
        decide: &mut dyn FnMut(&[u8]) -> Result<Decision, String>,
        out: &mut Vec<Step>,
    ) -> Result<(), String> {
        let state = match (std::mem::take(&mut self.state), chunk.first()) {
            (State::Idle, true) => State::Judging {
                data: Vec::new(),
                held: Vec::new(),
            },
            // Control-only chunks (CHANNEL_FLAG_SUSPEND / RESUME) carry nothing to judge.
            (State::Idle, false) if chunk.data.is_empty() => {
                out.push(Step::Forward(frame.to_vec()));
                return Ok(());
            }
            (State::Idle, false) => {
                return Err("virtual channel chunk without a first chunk".into());
            }
            (_, true) => return Err("virtual channel message started inside another".into()),
            (s, false) => s,
        };
        let next = match state {
            State::Judging { mut data, mut held } => {
                if data.len() + chunk.data.len() > MAX_MESSAGE || held.len() >= MAX_HELD {
                    return Err("virtual channel message too long to judge".into());
                }
                data.extend_from_slice(chunk.data);
                held.push(frame.to_vec());
                if data.len() >= need || chunk.last() {
                    match decide(&data[..need.min(data.len())])? {
                        Decision::Pass => {
                            out.extend(held.into_iter().map(Step::Forward));
                            State::Passing
                        }
                        Decision::Drop => State::Dropping,
                        Decision::Collect => State::Collecting(data),
                    }
                } else {
                    State::Judging { data, held }
                }
            }
            State::Passing => {
                out.push(Step::Forward(frame.to_vec()));
                State::Passing
            }
            State::Collecting(mut buf) => {
                if buf.len() + chunk.data.len() > MAX_MESSAGE {
                    return Err(format!(
                        "virtual channel message over {MAX_MESSAGE} bytes where psm must read it whole"
                    ));
                }
                buf.extend_from_slice(chunk.data);
                State::Collecting(buf)
            }
            other => other,
        };
        self.state = if chunk.last() {
            if let State::Collecting(buf) = next {
                out.push(Step::Message(buf));
            }
            State::Idle
        } else {
            next
        };
        Ok(())
    }
}
