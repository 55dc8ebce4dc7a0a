//! `psmctl user mfa …` (TOTP enrolment, with its QR code) and `psmctl user disable|enable|unlock`.

use std::io::Write;
use std::path::Path;

use clap::Subcommand;

use super::change;
use crate::cli::CliError;
use crate::client::Client;
use crate::protocol::{MfaEnrolment, Request};

/// `psmctl user mfa …`
#[derive(Debug, Subcommand)]
pub enum MfaCmd {
    /// Enrol a user for TOTP: prints the otpauth:// URI and a QR code to scan.
    Enroll {
        /// User name.
        name: String,
        /// Print only the URI (no QR code).
        #[arg(long)]
        no_qr: bool,
    },
    /// Remove a user's TOTP enrolment.
    Reset {
        /// User name.
        name: String,
    },
}

/// Draws `text` as a QR code with Unicode half blocks (two rows per line).
pub fn qr(text: &str) -> Result<String, CliError> {
    let code = qrcode::QrCode::new(text.as_bytes())
        .map_err(|e| CliError::Usage(format!("cannot draw the QR code: {e}")))?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Runs `user mfa …`.
pub fn mfa(data_dir: &Path, cmd: MfaCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        MfaCmd::Enroll { name, no_qr } => {
            let e: MfaEnrolment = Client::connect(data_dir)?
                .call_as(&Request::UserMfaEnroll { name: name.clone() })?;
            writeln!(
                out,
                "enrolled {name} for TOTP (policy version {})",
                e.version
            )?;
            writeln!(out, "{}", e.uri)?;
            if !no_qr {
                writeln!(out, "{}", qr(&e.uri)?)?;
            }
            writeln!(
                out,
                "scan it with an authenticator app; it is not shown again (psmctl user mfa reset {name} to start over)"
            )?;
            Ok(())
        }
        MfaCmd::Reset { name } => change(out, data_dir, &Request::UserMfaReset { name }),
    }
}

/// Runs `user disable|enable|unlock`.
pub fn user_state(data_dir: &Path, req: Request, out: &mut dyn Write) -> Result<(), CliError> {
    change(out, data_dir, &req)
}
