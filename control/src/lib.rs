//! psm-control: the policy daemon of psm and the library behind the `psmctl` admin CLI.
//!
//! What it does:
//! - keeps the policy (users, their keys, targets, accounts, grants) in a SQLite store
//!   ([`store`]), with account credentials sealed by an AES-256-GCM vault under `master.key`
//!   ([`vault`]);
//! - serves relays on `policy.sock`: a full [`psm_control_api::PolicySnapshot`] on connect and
//!   again after every change, and takes their audit events ([`daemon`]);
//! - appends every audit event, its own administrative changes included, to `audit.jsonl`
//!   ([`audit`]), and exports the stream to SIEM receivers over syslog ([`siem`]);
//! - serves `psmctl` on `control.sock` with a JSON-lines protocol ([`protocol`], [`client`]);
//! - implements the `psmctl` commands ([`cli`]; the RDP ones in [`cli_rdp`]), host-key scanning
//!   ([`scan`]), RDP certificate scanning ([`scan_rdp`]), and the recording commands on top of
//!   `psm-recorder-format` ([`recordings`]);
//! - keeps each psm user's NT hash for RDP logins, sealed like account credentials ([`ntlm`]).
//!
//! What it does not do: terminate SSH sessions (psm-relay does), write recordings
//! (psm-recorder does), or ever hand a credential back to psmctl.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod cli;
pub mod cli_policy;
pub mod cli_rdp;
pub mod client;
pub mod daemon;
pub mod datadir;
pub mod ntlm;
pub mod protocol;
pub mod reckey;
pub mod recordings;
pub mod retention;
pub mod review;
pub mod scan;
pub mod scan_rdp;
pub mod siem;
pub mod store;
pub mod validate;
pub mod vault;

mod table;
mod timefmt;

pub use daemon::ControlError;
pub use datadir::{init_data_dir, InitError};

#[cfg(test)]
mod testkeys;
